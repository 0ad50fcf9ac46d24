"""The words the parts of dockyard say to each other, defined once: frame types, what became of
a call, a version's role and its states. Standard library only; the sandbox bootstrap cannot
import dockyard, so it keeps its own copies, and a test checks that they match."""

from __future__ import annotations


class Frame:
    """The `type` of a frame on a child's pipes or a worker's connection."""

    SANDBOX = "sandbox"          # worker -> launcher: the spec of a child's view
    INIT = "init"                # worker -> child: what to import
    READY = "ready"              # child -> worker: imported, serving
    LOAD_ERROR = "load_error"    # child -> worker: the code cannot be imported
    INVOKE = "invoke"            # a call
    RESULT = "result"            # its reply
    SHUTDOWN = "shutdown"        # worker -> child: finish what you have, then exit
    CANCEL = "cancel"            # control plane -> worker: kill the process running a call
    OUTPUT = "output"            # control plane -> worker: what a running call printed so far
    HELLO = "hello"              # the first frame on a worker connection (with the token)
    POKE = "poke"                # control plane -> worker: reconcile now
    # Direct channels (a local worker's one-at-a-time processes; see common/direct.py):
    CHANNEL = "channel"          # worker -> child: serve the socket attached to this frame
    SLOT = "slot"                # worker -> child: show your call in hand on this page
    CHANNELS = "channels"        # web -> worker: the channels to a version's processes
    LOST = "lost"                # web -> worker: what became of a call sent down a channel
    # Liveness and fenced calls (see app/liveness.py):
    PING = "liveness"            # control plane -> worker, answered at once in kind
    ACK = "ack"                  # worker -> control plane: it has taken this call frame
    OK = "ok"
    ERROR = "error"


class Status:
    """What became of a call: a worker's reply and an invocation record say it the same way."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CRASHED = "crashed"
    CANCELLED = "cancelled"
    # A call that found no instance to run it (a 503): recorded too, so it can be listed.
    UNAVAILABLE = "unavailable"
    # Only between worker and control plane: the version is not running on that worker any
    # more (a redeploy moved it); the control plane routes the call again. Never recorded.
    NOT_RUNNING = "not_running"
    # Only between worker and control plane: the call frame reached the worker past the time
    # it had to be taken by (the control plane has given up on it): nothing ran. Never recorded.
    NOT_STARTED = "not_started"


# Every status an invocation record can hold (the list's filter accepts exactly these).
RECORD_STATUSES = (Status.QUEUED, Status.RUNNING, Status.SUCCEEDED, Status.FAILED,
                   Status.TIMED_OUT, Status.CRASHED, Status.CANCELLED, Status.UNAVAILABLE)
FINISHED_STATUSES = (Status.SUCCEEDED, Status.FAILED, Status.TIMED_OUT, Status.CRASHED,
                     Status.CANCELLED, Status.UNAVAILABLE)
# A call that failed: the function failed, ran out of time, or its process died (a cancel is
# the caller's doing; unavailable never reached a worker).
FAILED_STATUSES = (Status.FAILED, Status.TIMED_OUT, Status.CRASHED)


class Role:
    """What the control plane wants a worker to do with a version."""

    SERVE = "serve"              # run its instances and take calls
    STANDBY = "standby"          # keep it known; start it only for a pinned call


class VersionState:
    """A version's state on one worker, as its heartbeat reports it."""

    STANDBY = "standby"          # known, started on demand for pinned calls
    BUILDING = "building"        # fetching the artifact, building the venv
    STARTING = "starting"        # children booting
    READY = "ready"              # children serving
    IDLE = "idle"                # built, scaled to zero; starts on the first call
    DRAINING = "draining"        # finishing in-flight calls before stopping
    STOPPED = "stopped"
    FAILED = "failed"


class DeploymentStatus:
    """Where a deployment of a version across the live workers stands (workers that are not
    live -- lost, suspect, stopped -- are not counted)."""

    PENDING = "pending"          # no live worker has reported on it yet
    IN_PROGRESS = "in_progress"  # some live worker still builds or starts it
    READY = "ready"              # every live worker serves it
    # Every live worker has settled, some serve it and some failed: it serves, the failed
    # ones retry (with backoff) and it becomes ready once they manage.
    PARTIAL = "partial"
    FAILED = "failed"            # it failed on every live worker
    # Ended from outside before it settled (another version was deployed, or the container
    # undeployed): nothing is known against its version, which stays a rollback target.
    SUPERSEDED = "superseded"


# Statuses a deployment may still leave: `deploy --wait` follows one until it is in neither.
UNSETTLED_DEPLOYMENT_STATUSES = (DeploymentStatus.PENDING, DeploymentStatus.IN_PROGRESS)
SETTLED_DEPLOYMENT_STATUSES = (DeploymentStatus.READY, DeploymentStatus.PARTIAL,
                               DeploymentStatus.FAILED, DeploymentStatus.SUPERSEDED)
# A deployment that did not make its version serve (`deploy --wait` exits 1 on one).
UNDEPLOYED_STATUSES = (DeploymentStatus.FAILED, DeploymentStatus.SUPERSEDED)

# The states in which a worker takes calls for a version.
ROUTABLE_STATES = (VersionState.READY, VersionState.IDLE)

# A worker's exit code when its configuration cannot work on this host (EX_CONFIG): `serve`
# does not restart it, and stops with the worker's reason.
WORKER_CONFIG_EXIT = 78
