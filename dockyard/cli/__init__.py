"""The `dockyard` command. Output is for people by default and JSON with --json; errors are
one line and a non-zero exit."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import click
from click.core import ParameterSource

from ..common.http_client import api_path
from ..common.protocol import SETTLED_DEPLOYMENT_STATUSES, UNDEPLOYED_STATUSES, DeploymentStatus
from ..errors import DockyardError
from ..runner.server import UNIX_PATH_MAX, UNIX_PREFIX
from . import times
from .client import Client, Found, find_server, package_bytes
from .templates import write_template


def _fail(exc: DockyardError):
    raise click.ClickException(exc.message.splitlines()[0])


class Context:
    def __init__(self, url, token, data, as_json, verbose=False, tz=None):
        self.url, self.token, self.data, self.as_json = url, token, data, as_json
        self.verbose, self.tz = verbose, tz
        self.found: Found | None = None

    def find(self) -> Found:
        """The server and token (once per command); says on stderr which server it picked
        when several ran, and with --verbose how it found them."""
        if self.found is None:
            self.found = find_server(self.url, self.token, self.data,
                                     _given_in(self.url, "DOCKYARD_URL", "--url"),
                                     _given_in(self.token, "DOCKYARD_TOKEN", "--token"))
            if self.found.choice:
                click.echo(self.found.choice, err=True)
            if self.verbose:
                for line in self.found.describe():
                    click.echo(line, err=True)
        return self.found

    def client(self) -> Client:
        found = self.find()
        return Client(found.url, found.token)

    def emit(self, obj, human) -> None:
        if self.as_json:
            click.echo(json.dumps(obj, indent=2, sort_keys=True))
        else:
            human(obj)


def _given_in(value, variable: str, flag: str) -> str:
    return variable if value and os.environ.get(variable) == value else flag


pass_ctx = click.make_pass_decorator(Context)


# The global options, also taken after the verb (`dockyard ls --json`, `dockyard serve --data
# DIR`): each command gets them under names of their own, merged into the Context before its
# callback runs. A command with an option of the same spelling keeps its own (`worker --token`
# is the worker token). A command where some mean nothing (`serve`, `worker`, `init`) names
# the ones it takes (`global_options=`); the others are not offered there.
GLOBAL_OPTIONS = (
    ("--url", "global_url", "url", "Control plane URL (default: the server running from the "
     "data dir, else one started in this folder, else the most recent one).", ()),
    ("--token", "global_token", "token", "Admin token (default: from the server's data dir).",
     ()),
    ("--data", "global_data", "data", "Data dir (default ./.dockyard).", ()),
    ("--json", "global_json", "as_json", "Print JSON for scripts.", ()),
    ("--verbose", "global_verbose", "verbose", "Say which server, data dir and token the "
     "command used (on stderr).", ("-v",)),
    ("--tz", "global_tz", "tz", "Zone of the times printed: an IANA name, UTC (the default) "
     "or local.", ()),
)
FLAGS = ("--json", "--verbose")
METAVARS = {"--url": "URL", "--token": "TOKEN", "--data": "DIR", "--tz": "ZONE"}
ALL_GLOBALS = tuple(flag for flag, *_ in GLOBAL_OPTIONS)


class GlobalOptions:
    """Adds the global options to a command and merges what it was given into the Context."""

    def __init__(self, *args, global_options=ALL_GLOBALS, **kwargs):
        super().__init__(*args, **kwargs)
        self.global_options = global_options
        taken = {opt for param in self.params for opt in getattr(param, "opts", ())}
        for flag, name, _, text, short in GLOBAL_OPTIONS:
            if flag in global_options and flag not in taken:
                self.params.append(click.Option([flag, *short, name], is_flag=flag in FLAGS,
                                                default=None, help=text,
                                                metavar=METAVARS.get(flag)))

    def invoke(self, ctx):
        given = {attr: ctx.params.pop(name, None) for _, name, attr, _, _ in GLOBAL_OPTIONS}
        obj = ctx.find_object(Context)
        if obj is not None:
            for attr, value in given.items():
                if value:
                    setattr(obj, attr, value)
            if given["token"]:
                _warn_if_on_command_line(ctx, "global_token",
                                         "DOCKYARD_TOKEN (or the data dir's token)")
            times.use(obj.tz)
            if "--tz" in self.global_options and not isinstance(self, click.Group):
                times.shown_zone()   # a zone it does not know: said before anything runs
        return super().invoke(ctx)


class Command(GlobalOptions, click.Command):
    pass


class Group(GlobalOptions, click.Group):
    command_class = Command
    group_class = type  # subgroups are Groups too

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except DockyardError as exc:
            click.echo(f"Error: {exc.message.splitlines()[0]}", err=True)
            ctx.exit(1)


class ListByDefault(Group):
    """A first word that is not one of its commands is a container's NAME: `dockyard versions
    NAME` is `dockyard versions ls NAME` (and `dockyard aliases NAME` likewise)."""

    def resolve_command(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            return "ls", self.commands["ls"], args
        return super().resolve_command(ctx, args)


@click.group(cls=Group)
@click.option("--url", envvar="DOCKYARD_URL", show_envvar=True, metavar="URL",
              help=GLOBAL_OPTIONS[0][3])
@click.option("--token", envvar="DOCKYARD_TOKEN", show_envvar=True, metavar="TOKEN",
              help=GLOBAL_OPTIONS[1][3])
@click.option("--data", envvar="DOCKYARD_HOME", show_envvar=True, metavar="DIR",
              help=GLOBAL_OPTIONS[2][3])
@click.option("--json", "as_json", is_flag=True, help=GLOBAL_OPTIONS[3][3])
@click.option("--verbose", "-v", is_flag=True, help=GLOBAL_OPTIONS[4][3])
@click.option("--tz", envvar="DOCKYARD_TZ", show_envvar=True, metavar="ZONE",
              help=GLOBAL_OPTIONS[5][3])
@click.version_option(package_name="dockyard")
@click.pass_context
def cli(ctx, url, token, data, as_json, verbose, tz):
    """dockyard: deploy Python functions as containers and call them over HTTP."""
    _warn_if_on_command_line(ctx, "token", "DOCKYARD_TOKEN (or the data dir's token)")
    ctx.obj = Context(url, token, data, as_json, verbose, tz)


def _warn_if_on_command_line(ctx, param: str, instead: str) -> None:
    """A token given as an argument is in /proc/<pid>/cmdline, which every local user can
    read."""
    if ctx.get_parameter_source(param) is ParameterSource.COMMANDLINE:
        click.echo("Warning: a --token given on the command line can be read by other local "
                   f"users from the process list; use {instead} instead.", err=True)


def _age(ts) -> str:
    """An epoch time for people, with its zone (see times.py)."""
    return times.at(ts)


def _table(rows: list[list], headers: list[str]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    for row in [headers, *rows]:
        click.echo("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())


# -- serving ------------------------------------------------------------------------------

@cli.command(global_options=("--data",),
             short_help="Run the control plane, a local worker and the deploy folder.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface; mind --invoke-auth).")
@click.option("--port", default=8080, show_default=True, type=int, help="0 picks a free port.")
@click.option("--deploy-dir", default="deploy", show_default=True,
              help="Watched folder: packages dropped in are deployed, removed ones undeployed.")
@click.option("--deploy-poll", type=float, metavar="SECONDS",
              help="Poll the deploy folder every SECONDS instead of inotify (network "
                   "filesystems).")
@click.option("--no-deploy-dir", is_flag=True, help="Watch no deploy folder.")
@click.option("--web-workers", default=2, show_default=True, type=int,
              help="Web (gunicorn) processes answering the API and /invoke.")
@click.option("--web-reserve", default=4, show_default=True, type=click.IntRange(min=0),
              metavar="N", help="Threads of each web process kept for the other containers: "
              "one container's synchronous calls hold at most 8 of a process's 8 + N, past "
              "that they get a 429 at once (0: no bound).")
@click.option("--no-local-worker", is_flag=True, help="Do not start a worker in this process.")
@click.option("--invoke-auth", is_flag=True, help="Require a token on /invoke.")
@click.option("--public-metrics", is_flag=True,
              help="Let anyone read /metrics (it needs the admin token otherwise).")
@click.option("--index-url", envvar="DOCKYARD_INDEX_URL", metavar="URL",
              help="Package index for venv builds; one with a password is better given in "
                   "DOCKYARD_INDEX_URL (an argument is visible in the process list).")
@click.option("--find-links", multiple=True, metavar="DIR",
              help="Wheelhouse folder for venv builds (may be given several times).")
@click.option("--offline", is_flag=True, help="Never reach a package index.")
@click.option("--python", "python", help="Interpreter venvs are built from.")
@click.option("--uid-base", type=int, default=None,
              help="Where the host-wide uid registry starts giving uids to containers.")
@click.option("--no-view", is_flag=True,
              help="Run children without their private view (weaker isolation).")
@click.option("--keep-invocations", default="7d", show_default=True, metavar="DURATION",
              help="Remove invocation records older than this (90s, 10m, 2h, 7d; 0 or off: "
                   "keep them all).")
@click.option("--keep-versions", default="10", show_default=True, metavar="N",
              help="Keep the N newest versions of each container besides those in use (0 or "
                   "off: keep them all).")
@click.option("--prune-every", default="60s", show_default=True, metavar="DURATION",
              help="How often retention runs.")
@click.option("--forget-workers-after", default="10m", show_default=True, metavar="DURATION",
              help="Forget workers stopped or lost for this long (0 or off: keep them).")
@click.option("--db", "db_url", envvar="DOCKYARD_DB", metavar="URL",
              help="PostgreSQL database shared by several control planes "
                   "(postgresql://USER@HOST/DB; default: SQLite in the data dir). One with a "
                   "password is better given in DOCKYARD_DB.")
@pass_ctx
def serve(ctx, host, port, deploy_dir, deploy_poll, no_deploy_dir, web_workers, web_reserve,
          no_local_worker, invoke_auth, public_metrics, index_url, find_links, offline, python,
          uid_base, no_view, keep_invocations, keep_versions, prune_every,
          forget_workers_after, db_url):
    """Run the control plane, a local worker and the deploy folder."""
    from ..app.store.engine import is_postgres
    from .serve import ServeOptions, Supervisor, retention_options
    if db_url:
        if not is_postgres(db_url):
            raise click.BadParameter("give a postgresql://USER@HOST[:PORT]/DB URL (leave it "
                                     "out for SQLite in the data dir)", param_hint="--db")
        # For every process serve starts (web processes, scheduler, deploy folder).
        os.environ["DOCKYARD_DB"] = db_url
    else:
        os.environ.pop("DOCKYARD_DB", None)
    retention = retention_options(keep_invocations, keep_versions, prune_every,
                                  forget_workers_after)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    worker_args = _uv_args(find_links, offline, python)
    if index_url:
        # To the local worker through its environment, never its command line.
        os.environ["DOCKYARD_INDEX_URL"] = index_url
    if uid_base is not None:
        worker_args += ["--uid-base", str(uid_base)]
    if no_view:
        worker_args.append("--no-view")
    options = ServeOptions(host=host, port=port, data=ctx.data,
                           deploy_dir=None if no_deploy_dir else deploy_dir or None,
                           deploy_poll=deploy_poll,
                           web_workers=web_workers, web_reserve=web_reserve,
                           local_worker=not no_local_worker,
                           invoke_auth=invoke_auth, public_metrics=public_metrics,
                           worker_args=worker_args,
                           retention=retention)
    sys.exit(Supervisor(options).run())


def _uv_args(find_links, offline, python) -> list[str]:
    args = []
    for folder in find_links:
        args += ["--find-links", str(Path(folder).absolute())]
    if offline:
        args.append("--offline")
    if python:
        args += ["--python", python]
    return args


@cli.command(global_options=("--data",),
             short_help="Run a worker that serves a control plane's containers.")
@click.option("--server", "servers", multiple=True, envvar="DOCKYARD_SERVER", metavar="URL",
              help="A control plane's URL. Give it once per control plane sharing one store "
                   "(or DOCKYARD_SERVER=URL,URL2): the worker uses the first, and the next "
                   "one when the one it uses stops answering.")
@click.option("--url", "url_alias", multiple=True, hidden=True,
              help="The same as --server.")
@click.option("--token-file", type=click.Path(dir_okay=False),
              help="File holding the worker token (<data>/tokens/worker on the control plane).")
@click.option("--token", "worker_token", envvar="DOCKYARD_TOKEN",
              help="Worker token; prefer --token-file or DOCKYARD_TOKEN (an argument is "
                   "visible in the process list).")
@click.option("--listen", default="127.0.0.1:0", show_default=True,
              help="Address of this worker's invoke endpoint: HOST:PORT or unix:PATH.")
@click.option("--advertise", help="Address the control plane should dial (default: --listen).")
@click.option("--name", callback=lambda c, p, v: _worker_name(v),
              help="This worker's name (default: the host's name and a suffix of the data "
                   "dir, kept across restarts).")
@click.option("--index-url", envvar="DOCKYARD_INDEX_URL", metavar="URL",
              help="Package index for venv builds; one with a password is better given in "
                   "DOCKYARD_INDEX_URL (an argument is visible in the process list).")
@click.option("--find-links", multiple=True, metavar="DIR",
              help="Wheelhouse folder for venv builds (may be given several times).")
@click.option("--offline", is_flag=True, help="Never reach a package index.")
@click.option("--python", "python", help="Interpreter venvs are built from.")
@click.option("--uid-base", type=int, default=None,
              help="Where the host-wide uid registry starts giving uids to containers.")
@click.option("--no-view", is_flag=True,
              help="Run children without their private view (weaker isolation).")
@click.pass_context
def worker(click_ctx, servers, url_alias, token_file, worker_token, listen, advertise, name,
           index_url, find_links, offline, python, uid_base, no_view):
    """Run a worker that serves a control plane's containers.

    With several --server URLs (control planes that share one store) the worker talks to one
    at a time: when it stops answering, the worker moves to the next one at once, keeping
    its id, its versions and the calls it is running."""
    from .worker import run_worker
    ctx = click_ctx.find_object(Context)
    servers = _control_planes(ctx, servers, url_alias)
    worker_token = _worker_token(click_ctx, token_file, worker_token)
    if listen.startswith(UNIX_PREFIX):
        listen = f"{UNIX_PREFIX}{_socket_path(listen[len(UNIX_PREFIX):])}"
    sys.exit(run_worker(servers, worker_token, ctx.data, listen, advertise, index_url,
                        find_links, offline, python, uid_base, view=not no_view, name=name))


def _control_planes(ctx, servers, url_alias) -> list[str]:
    """The worker's control planes, in order: --server (or DOCKYARD_SERVER), then the worker's
    --url (an alias); without either, the global --url (or DOCKYARD_URL)."""
    from ..runner.servers import parse
    given = [*servers, *url_alias] or ([ctx.url] if ctx.url else [])
    try:
        urls = parse(given)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--server") from None
    if not urls:
        raise click.UsageError("give the control plane's URL: --server URL (once per control "
                               "plane), or DOCKYARD_SERVER")
    return urls


def _worker_name(name: str | None) -> str | None:
    from ..app.datadir import WORKER_NAME_RE, WORKER_NAME_RULE
    if name is not None and not WORKER_NAME_RE.fullmatch(name):
        raise click.BadParameter(WORKER_NAME_RULE, param_hint="--name")
    return name


def _socket_path(text: str) -> Path:
    """An absolute path (the control plane dials it from another folder) that fits in a
    socket address."""
    if not text:
        raise click.UsageError("--listen unix: wants a path, e.g. unix:/run/dockyard/invoke.sock")
    path = Path(text).absolute()
    if len(os.fsencode(path)) > UNIX_PATH_MAX:
        raise click.UsageError(f"--listen: {path} is longer than the {UNIX_PATH_MAX} bytes a "
                               "socket path may have; pick a shorter one")
    return path


def _worker_token(click_ctx, token_file, worker_token) -> str:
    """The worker token from --token-file, else from DOCKYARD_TOKEN or --token."""
    if token_file:
        if click_ctx.get_parameter_source("worker_token") is ParameterSource.COMMANDLINE:
            raise click.UsageError("give the worker token once: --token-file or --token")
        try:
            worker_token = Path(token_file).read_text().strip()
        except OSError as exc:
            raise click.ClickException(f"cannot read the worker token from {token_file}: "
                                       f"{exc.strerror}") from None
        if not worker_token:
            raise click.ClickException(f"the token file {token_file} is empty")
        return worker_token
    if not worker_token:
        raise click.UsageError("the worker token is missing: give --token-file PATH or set "
                               "DOCKYARD_TOKEN")
    _warn_if_on_command_line(click_ctx, "worker_token", "--token-file or DOCKYARD_TOKEN")
    return worker_token


# -- packages -----------------------------------------------------------------------------

@cli.command(global_options=(), short_help="Create a new container package NAME.")
@click.argument("name")
def init(name):
    """Create a new container package NAME from a template."""
    try:
        path = write_template(Path(name))
    except DockyardError as exc:
        _fail(exc)
    click.echo(f"created {path}/ (dockyard.toml, main.py); deploy it with: "
               f"dockyard deploy {path} --wait")


@cli.command(short_help="Deploy a package (folder, .zip or .tar.gz).")
@click.argument("path")
@click.option("--wait", is_flag=True, help="Wait until the version serves on every live worker, "
              "or fails on some (exit 3: partial) or all (exit 1).")
@click.option("--no-activate", is_flag=True, help="Upload only; activate later.")
@click.option("--timeout", default=600, show_default=True, type=float,
              help="How long --wait waits, in seconds.")
@pass_ctx
def deploy(ctx, path, wait, no_activate, timeout):
    """Deploy a package (folder, .zip or .tar.gz)."""
    client = ctx.client()
    record = client.upload(package_bytes(path), activate=not no_activate)
    what = f"{record['container']}@{record['version']}"
    if wait and record.get("deployment") and record.get("deployment_status") != "ready":
        record["deployment"] = _wait_deployment(ctx, client, record["deployment"], timeout,
                                                what, record["container"])
    elif record.get("deployment"):
        record["deployment"] = client.json("GET", api_path("deployments", record['deployment']))

    def human(r):
        note = "" if r["created"] else " (already deployed: same content)"
        click.echo(f"{r['container']}@{r['version']} uploaded{note}")
        dep = r.get("deployment")
        if isinstance(dep, dict):
            click.echo(f"deployment {dep['id']}: {dep['status']}")
    dep = record.get("deployment")
    failed = isinstance(dep, dict) and dep["status"] in UNDEPLOYED_STATUSES
    if failed:
        active, serving = _container_state(client, record["container"])
        record["active"] = active == record["version"]
        record["serving"] = serving == record["version"]
    ctx.emit(record, human)
    if failed:
        raise click.ClickException(
            f"{what} failed to deploy: {_failure(dep)}; "
            f"{_left(record['container'], record['version'], active, serving)} "
            f"(the new version is stored; see dockyard deployments {record['container']})")
    if wait and isinstance(dep, dict) and dep["status"] == DeploymentStatus.PARTIAL:
        raise PartialDeployment(
            f"{what} is only partly deployed: it {dep.get('error') or 'failed on some workers'}"
            "; those workers try again by themselves (5 s, doubling to 5 min) and the "
            f"deployment turns ready once they manage (see dockyard deployments "
            f"{record['container']})")


class PartialDeployment(click.ClickException):
    """`deploy --wait` when the version serves on some live workers and failed on others."""

    exit_code = 3


def _failure(deployment: dict) -> str:
    """Why a deployment failed, in one line: the workers' reason and the build log's cause."""
    from ..app.deployfolder.client import failure_reason
    return failure_reason(deployment).rstrip(".")


def _container_state(client, name: str) -> tuple[str | None, str | None]:
    """(active version, serving version) of a container as the server has them now."""
    try:
        detail = client.json("GET", api_path("containers", name))
    except DockyardError:
        return None, None
    return detail.get("active_version"), detail.get("serving_version")


def _left(name: str, failed: str, active: str | None, serving: str | None) -> str:
    """What serves `name` (its `active` and `serving` versions) after a deployment of `failed`
    did not succeed."""
    if serving and serving != failed:
        still = f"still serving {name}@{serving}"
        return still if active == serving else (
            f"{still}, and {name}@{active} is active" if active else still)
    if serving == failed:
        return f"{name}@{failed} serves on the workers where it is ready"
    return f"nothing serves {name} (it has no version that started)"


def _wait_deployment(ctx, client, deployment_id: str, timeout: float, what: str,
                     name: str) -> dict:
    """Follow a deployment to ready or failed, showing each worker's build log and state. A
    deployment still under way after `timeout`, or that no worker takes, ends the command
    with what it left: the version active, and the version that serves meanwhile."""
    start = time.monotonic()
    shown: dict[str, int] = {}
    states: dict[str, str] = {}
    while True:
        dep = client.json("GET", api_path("deployments", deployment_id))
        for w in dep["workers"]:
            lines = (w.get("log") or "").splitlines()
            if not ctx.as_json:
                who = w.get("name") or w["worker"]
                for line in lines[shown.get(w["worker"], 0):]:
                    click.echo(f"[{who}] {line}", err=True)
                if states.get(w["worker"]) != w["state"]:
                    states[w["worker"]] = w["state"]
                    click.echo(f"[{who}] {w['state']}", err=True)
            shown[w["worker"]] = len(lines)
        if dep["status"] in SETTLED_DEPLOYMENT_STATUSES:
            return dep
        waited = time.monotonic() - start
        if (not dep["workers"] and waited > min(10, timeout)) or waited > timeout:
            active, serving = _container_state(client, name)
            why = ("no worker is connected to take it" if not dep["workers"]
                   else f"it is still {dep['status']} after {timeout:g}s")
            state = (f"{name}@{active} is active and takes over once a worker has it ready"
                     if active else f"{name} has no active version")
            if serving and serving != active:
                state += f"; {name}@{serving} serves until then"
            raise click.ClickException(
                f"stopped waiting for {what} (deployment {deployment_id}): {why}; {state} "
                f"(see dockyard deployments {name})")
        time.sleep(0.2)


@cli.command(name="ls", short_help="List containers.")
@pass_ctx
def list_containers(ctx):
    """List containers."""
    data = ctx.client().json("GET", "/api/containers")

    def human(d):
        if not d["containers"]:
            click.echo("no containers yet; deploy one with `dockyard deploy PATH`")
            return
        _table([[c["name"], c["serving_version"] or "-", c["active_version"] or "-",
                 c["versions"], _age(c["updated_at"])] for c in d["containers"]],
               ["NAME", "SERVING", "ACTIVE", "VERSIONS", "UPDATED"])
    ctx.emit(data, human)


@cli.command(short_help="Serve an earlier version of NAME (default: the previous one).")
@click.argument("name")
@click.argument("version", required=False)
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="Wait until VERSION serves (or its deployment fails).")
@click.option("--timeout", default=600, show_default=True, type=float,
              help="How long --wait waits, in seconds.")
@pass_ctx
def rollback(ctx, name, version, wait, timeout):
    """Make VERSION the active version of NAME again; without VERSION, the version before
    the one serving (uploaded before it, and not one that failed to deploy). Nothing changes
    if no worker is there to deploy it, or if its deployment fails."""
    client = ctx.client()
    if version is None:
        from .versions import previous_version
        current, version, skipped = previous_version(client, name)
        click.echo(f"rolling {name} back from {current} to {version}, the version before it"
                   + (f" (skipping {', '.join(skipped)}: failed to deploy)" if skipped else ""),
                   err=True)
    record = client.json("POST", api_path("containers", name, "activate"),
                         json={"version": version})
    what = f"{name}@{version}"
    if wait and record.get("deployment") and record.get("deployment_status") != "ready":
        record["deployment"] = _wait_deployment(ctx, client, record["deployment"], timeout,
                                                what, name)
    elif record.get("deployment"):
        record["deployment"] = client.json("GET", api_path("deployments", record['deployment']))
    dep = record.get("deployment")

    def human(r):
        if not isinstance(dep, dict) or dep["status"] == "ready":
            click.echo(f"{name} now serves {version}")
        elif dep["status"] not in UNDEPLOYED_STATUSES:
            click.echo(f"{what} is active; deployment {dep['id']}: {dep['status']} "
                       f"(it serves once a worker has it ready)")
    ctx.emit(record, human)
    if isinstance(dep, dict) and dep["status"] in UNDEPLOYED_STATUSES:
        active, serving = _container_state(client, name)
        if active != version:
            left = f"nothing changed: {name}@{active} is still active" + (
                " and serving" if serving == active else
                f", and {name}@{serving} serves" if serving else "")
        else:
            left = f"{what} stays active ({_left(name, version, active, serving)})"
        raise click.ClickException(f"rollback to {what} failed: {_failure(dep)}; {left} "
                                   f"(see dockyard deployments {name})")


@cli.command(name="rm", short_help="Undeploy container NAME (and delete its versions).")
@click.argument("name")
@click.option("--keep-versions", is_flag=True,
              help="Only take it out of service: keep its versions and package files.")
@pass_ctx
def remove(ctx, name, keep_versions):
    """Undeploy container NAME: its instances stop, and its versions and their package
    files are deleted (with --keep-versions, kept for a later `dockyard rollback`)."""
    data = ctx.client().json("DELETE", api_path("containers", name),
                             params={"keep_versions": "1"} if keep_versions else None)

    def human(d):
        if keep_versions:
            click.echo(f"{name} undeployed; its {d['versions_kept']} version(s) are kept "
                       f"(`dockyard rollback {name} VERSION` deploys one again)")
        else:
            click.echo(f"{name} removed: undeployed, and its versions deleted")
    ctx.emit(data, human)


@cli.group(invoke_without_command=True, short_help="List workers; `workers rm NAME` forgets one.")
@click.pass_context
def workers(click_ctx):
    """List workers: name, state, last seen, versions, calls in flight (`workers rm NAME`
    forgets one that is gone)."""
    if click_ctx.invoked_subcommand is not None:
        return
    ctx = click_ctx.find_object(Context)
    data = ctx.client().json("GET", "/api/workers")

    def human(d):
        if not d["workers"]:
            click.echo("no workers registered")
            return
        _table([[w["name"], w["state"], _age(w["last_seen"]), w.get("calls_in_flight", 0),
                 ", ".join(f"{v['container']}@{v['version']}:{v['state']}"
                           for v in w["versions"]) or "-", w["id"]] for w in d["workers"]],
               ["NAME", "STATE", "LAST SEEN", "IN FLIGHT", "VERSIONS", "ID"])
    ctx.emit(data, human)


@workers.command(name="rm", short_help="Forget worker NAME (one that is stopped or lost).")
@click.argument("name")
@pass_ctx
def workers_rm(ctx, name):
    """Forget worker NAME (or its id): one that is stopped or lost; a live one is refused."""
    data = ctx.client().json("DELETE", api_path("workers", name))
    ctx.emit(data, lambda d: click.echo(f"worker {d['name']} ({d['id']}) forgotten"))


from .aliases import aliases  # noqa: E402 - needs Context from above
from .calls import invoke  # noqa: E402 - needs Context from above
from .cancel import cancel  # noqa: E402 - needs Context from above
from .history import deployments, invocations, logs  # noqa: E402 - needs Context from above
from .jobs import jobs  # noqa: E402 - needs Context and _table from above
from .status import status  # noqa: E402
from .traffic import traffic  # noqa: E402
from .versions import versions  # noqa: E402

cli.add_command(aliases)
cli.add_command(invoke)
cli.add_command(deployments)
cli.add_command(invocations)
cli.add_command(logs)
cli.add_command(cancel)
cli.add_command(jobs)
cli.add_command(status)
cli.add_command(traffic)
cli.add_command(versions)


def main() -> None:
    cli(prog_name="dockyard")
