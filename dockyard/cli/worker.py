"""`dockyard worker`: take the worker folder (one owner at a time), set up isolation and uv,
print the isolation summary, run the agent."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click
import uv

from ..app.datadir import DataDir, InUse, hold_lock, inherited_lock
from ..common.protocol import WORKER_CONFIG_EXIT
from ..runner.agent import Agent, WorkerConfig, WorkerRefused
from ..runner.server import UNIX_PREFIX
from ..runner.venvs import UvOptions
from ..sandbox.cgroups import remove_root, sweep_stale
from ..sandbox.isolation import (DEFAULT_UID_BASE, NOBODY, Isolation, choose_python,
                                 unreachable_ancestor)


class WorkerConfigError(click.ClickException):
    exit_code = WORKER_CONFIG_EXIT


def _address(text: str) -> tuple[str, int]:
    if text.startswith(UNIX_PREFIX):
        return text, 0   # the invoke server takes a host of the form unix:PATH as a socket
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise WorkerConfigError(f"--listen wants HOST:PORT or unix:PATH, not '{text}'")
    return host.strip("[]"), int(port)


def take_worker_folder(data_dir: DataDir) -> int:
    """The lock on the worker folder, before anything else touches it (no kill of leftovers,
    no sweep, no cgroup): a second worker on a data dir in use stops here with one line.
    Under serve, the lock serve took for its local worker."""
    fd = inherited_lock(data_dir.worker_lock)
    if fd is not None:
        return fd
    try:
        return hold_lock(data_dir.worker_lock)
    except InUse as exc:
        raise WorkerConfigError(
            f"the worker folder {data_dir.worker} is in use by {exc.holder} (a dockyard worker "
            f"or serve); each worker needs a data dir of its own: give this one --data DIR "
            f"(or DOCKYARD_HOME)") from None


def run_worker(servers, token, data, listen, advertise, index_url, find_links, offline, python,
               uid_base, view: bool = True, name: str | None = None) -> int:
    os.umask(0o077)
    data_dir = DataDir.at(data)
    take_worker_folder(data_dir)   # its descriptor stays open: held until this process exits
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    isolation = Isolation(uid_base=uid_base or DEFAULT_UID_BASE, namespaces=view)
    isolation.detect(f"w{os.getpid()}")
    if isolation.cgroups is not None:
        sweep_stale(isolation.cgroups)
    probe_uid = NOBODY if isolation.drop_privileges else None
    try:
        interpreter, why = choose_python(python, probe_uid, isolation.runnable)
    except RuntimeError as exc:
        raise WorkerConfigError(str(exc)) from None
    isolation.use_interpreter(interpreter)
    # The worker folder itself is the agent's to open up (0711 without a view); what lies
    # above it must already let other uids through.
    blocked = (unreachable_ancestor(data_dir.worker.parent)
               if isolation.drop_privileges and isolation.view is None else None)
    if blocked is not None:
        # Only without namespaces do children reach their code through host paths.
        raise WorkerConfigError(
            f"the data dir {data_dir.root} is below {blocked}, which other users cannot "
            f"enter (mode {oct(blocked.stat().st_mode & 0o777)}), and this host gives "
            f"children no private view ({isolation.view_note}); pass a --data dir outside it")
    isolation.notes["interpreter"] = {"on": True, "how": why}
    options = UvOptions(uv_bin=uv.find_uv_bin(), python=interpreter, index_url=index_url,
                        find_links=tuple(str(Path(f).absolute()) for f in find_links),
                        offline=offline)
    config = WorkerConfig(servers=servers, token=token, worker_dir=data_dir.worker,
                          uv=options, isolation=isolation, listen=_address(listen),
                          advertise=advertise, name=name or data_dir.default_worker_name())
    try:
        agent = Agent(config)
    except OSError as exc:
        raise WorkerConfigError(f"cannot listen on {listen}: {exc.strerror or exc}") from None
    lines = ["dockyard worker isolation:"]
    for name, item in isolation.summary().items():
        state = "on " if item.get("on") else "OFF"
        lines.append(f"  {name:<14} {state} {item.get('how') or item.get('why')}")
    click.echo("\n".join(lines))
    sys.stdout.flush()
    try:
        return agent.run()
    except WorkerRefused as exc:
        raise WorkerConfigError(str(exc)) from None
    finally:
        if isolation.cgroups is not None:
            remove_root(isolation.cgroups)
