"""Everyday CLI use, through the real CLI against a real `serve`: times that say their zone,
errors that name what is missing, help that fits, `rollback NAME` to the version before,
`invoke -v` / `--id` / `@FILE` / `-`, and `jobs edit`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import datetime, timezone
from zoneinfo import ZoneInfo

import click

from conftest import Server, one_line_error, poll_until
from dockyard.cli import cli

MISSING = "dockyard-no-such-distribution"   # not in the wheelhouse: the build fails offline


def shown(epoch: float, zone) -> str:
    moment = datetime.fromtimestamp(epoch, zone)
    return f"{moment:%Y-%m-%d %H:%M:%S} {moment.tzname()}"


# -- times --------------------------------------------------------------------------------

def test_every_time_says_its_zone_and_a_job_shows_its_own_beside(server, pkg):
    server.cli("deploy", str(pkg("echo", name="ev-times", version="1")), "--wait")
    server.cli("jobs", "add", "ev-berlin", "ev-times/echo", "@every 1h", "--timezone",
               "Europe/Berlin", "--payload", '"cron"')
    ran = json.loads(server.cli("jobs", "run", "ev-berlin", "--wait", "--json").stdout)
    call = server.api("GET", f"/api/invocations/{ran['invocation_id']}").json()
    run_row = server.api("GET", "/api/jobs/ev-berlin/runs").json()["runs"][0]
    berlin, utc = ZoneInfo("Europe/Berlin"), timezone.utc

    # The call in `invocations`: UTC by default, said.
    row = next(line for line in server.cli("invocations", "ev-times").stdout.splitlines()
               if line.startswith(call["id"]))
    assert row.endswith(shown(call["created_at"], utc)) and row.endswith(" UTC"), row
    # The job's run: in the job's zone, UTC beside it (the same clock as `invocations`).
    runs = server.cli("jobs", "runs", "ev-berlin").stdout.splitlines()
    fired = datetime.fromtimestamp(run_row["fired_at"], utc)
    # UTC's time beside Berlin's, and its date too where the two dates differ (an hour a day).
    beside = fired.strftime("%H:%M:%S" if fired.date() == datetime.fromtimestamp(
        run_row["fired_at"], berlin).date() else "%Y-%m-%d %H:%M:%S")
    assert f"{shown(run_row['fired_at'], berlin)} ({beside} UTC)" in runs[1], runs
    # Another zone for the CLI: --tz before or after the verb, or DOCKYARD_TZ.
    for args, env in ((["--tz", "Europe/Berlin", "invocations", "ev-times"], {}),
                      (["invocations", "ev-times", "--tz", "Europe/Berlin"], {}),
                      (["invocations", "ev-times"], {"DOCKYARD_TZ": "Europe/Berlin"})):
        out = cli_run(server, *args, env=env).stdout
        assert shown(call["created_at"], berlin) in out, (args, out)
    # The job's run with the CLI in the job's own zone: once.
    same = cli_run(server, "--tz", "Europe/Berlin", "jobs", "runs", "ev-berlin").stdout
    assert f"{shown(run_row['fired_at'], berlin)}  " in same and " UTC)" not in same
    # `local`: this machine's zone, named.
    local = datetime.fromtimestamp(call["created_at"]).astimezone()
    out = cli_run(server, "--tz", "local", "invocations", "ev-times").stdout
    assert f"{local:%Y-%m-%d %H:%M:%S} {local.tzname()}" in out
    # Next fires and the last success: the job's zone with UTC beside.
    show = server.cli("jobs", "show", "ev-berlin").stdout
    fires = [line.strip() for line in show.splitlines() if line.startswith("  20")]
    assert len(fires) == 5 and all(
        re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d CES?T \((\d{4}-\d\d-\d\d )?"
                     r"\d\d:\d\d:\d\d UTC\)", f) for f in fires), fires
    # The last success is when the run finished (not when it fired: on a busy machine the two
    # fall in different seconds), once the scheduler has seen it finish.
    done = poll_until(lambda: server.api("GET", "/api/jobs/ev-berlin").json()[
        "last_success_at"], 30, "the job's last success recorded")
    show = server.cli("jobs", "show", "ev-berlin").stdout
    assert f"last success: {shown(done, berlin)}" in show, show
    # Everything else that prints a time says its zone too.
    for args in (["ls"], ["versions", "ev-times"], ["workers"], ["deployments", "ev-times"],
                 ["status", "ev-times"]):
        out = server.cli(*args).stdout
        stamps = re.findall(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d( \S+)?", out)
        assert stamps and all(zone == " UTC" for zone in stamps), (args, out)
    # A zone nobody knows: one line, before anything runs.
    bad = cli_run(server, "--tz", "Mars/Olympus", "ls", check=False)
    assert "unknown zone 'Mars/Olympus'" in one_line_error(bad)
    assert json.loads(server.cli("jobs", "runs", "ev-berlin", "--json").stdout)[
        "runs"][0]["fired_at"] == run_row["fired_at"]   # --json keeps epoch seconds


def cli_run(server, *args: str, env: dict | None = None, check: bool = True):
    """server.cli with more environment."""
    full = dict(os.environ, DOCKYARD_URL=server.url, DOCKYARD_TOKEN=server.admin, **(env or {}))
    done = subprocess.run([sys.executable, "-m", "dockyard", "--data", str(server.data), *args],
                          capture_output=True, text=True, env=full, timeout=300)
    if check:
        assert done.returncode == 0, (done.stdout, done.stderr)
    return done


# -- errors that name what is missing ---------------------------------------------------------

def test_errors_name_what_is_missing(server, pkg):
    assert one_line_error(server.cli("deployments", "dep_nope", check=False)) == (
        "Error: no deployment with id 'dep_nope'; `dockyard deployments NAME` shows a "
        "container's latest one")
    assert one_line_error(server.cli("logs", "inv_nope", check=False)).startswith(
        "Error: no invocation with id 'inv_nope' (records older than serve's "
        "--keep-invocations are removed)")
    server.cli("deploy", str(pkg("echo", name="ev-errors", version="1")), "--wait")
    never = server.cli("jobs", "add", "ev-never", "ev-errors/echo", "0 0 31 2 *",
                       check=False)
    assert one_line_error(never).startswith(
        "Error: BadRequest: schedule '0 0 31 2 *': never fires: no month it names has day 31")
    detail = server.cli("status", "ev-errors").stdout
    limits = next(line for line in detail.splitlines() if line.strip().startswith("limits"))
    assert "network on" in limits and "timeout 30 s" in limits and "True" not in limits
    assert "memory 512 MB" in limits and "=" not in limits


def test_a_name_is_one_path_segment_whatever_it_holds(server):
    """A name with ?, # or % is sent as itself (it was sent as a path and a query)."""
    for name in ("ev-odd?x=1", "ev#%2e"):
        for verb, words in ((["status", name], "no container named"),
                            (["versions", name], "no container named"),
                            (["traffic", name], "no container named"),
                            (["rollback", name, "1"], "no container named"),
                            (["rm", name], "no container named"),
                            (["jobs", "show", name], "no job named"),
                            (["workers", "rm", name], "no worker")):
            line = one_line_error(server.cli(*verb, check=False))
            assert words in line and repr(name) in line, (verb, line)


# -- help that fits -------------------------------------------------------------------------

def commands(group: click.Group, prefix=()):
    for name, command in sorted(group.commands.items()):
        yield prefix + (name,), command
        if isinstance(command, click.Group):
            yield from commands(command, prefix + (name,))


def test_help_lists_every_verb_whole_and_only_options_that_mean_something(server):
    groups = [()] + [path for path, c in commands(cli) if isinstance(c, click.Group)]
    for path in groups:
        out = server.cli(*path, "--help").stdout
        listing = out.split("Commands:\n", 1)[1].splitlines()
        assert listing and all(re.match(r"  [a-z]", line) for line in listing), out
        assert not any("..." in line or "…" in line for line in listing), out
    for path, command in commands(cli):
        for param in command.params:
            if isinstance(param, click.Option) and not param.hidden:
                assert param.help, f"dockyard {' '.join(path)} {param.opts[0]} has no help"
    serve_help = server.cli("serve", "--help").stdout
    assert "--data" in serve_help
    assert not re.search(r"--(url|token|json|verbose|tz)\b", serve_help), serve_help
    worker_help = server.cli("worker", "--help").stdout
    assert "--server URL" in worker_help and "--token TEXT" in worker_help
    assert not re.search(r"--(url|json|verbose|tz)\b", worker_help), worker_help
    init_help = server.cli("init", "--help").stdout
    assert not re.search(r"--(data|url|token|json)\b", init_help), init_help
    for flag in ("--url", "--token", "--data", "--json", "--verbose", "--tz"):
        assert flag in server.cli("ls", "--help").stdout


# -- rollback to the version before ---------------------------------------------------------

def test_rollback_without_a_version_goes_to_the_one_before(server, pkg):
    for version, extra in (("1", ""), ("2", f'dependencies = ["{MISSING}"]\n'), ("3", "")):
        server.cli("deploy", str(pkg("echo", name="ev-roll", version=version,
                                     manifest_extra=extra)), "--wait", check=version != "2")
    assert server.invoke("ev-roll/echo", 0).headers["X-Dockyard-Version"] == "3"
    rolled = server.cli("rollback", "ev-roll")
    assert rolled.stderr.splitlines()[0] == (
        "rolling ev-roll back from 3 to 1, the version before it (skipping 2: failed to "
        "deploy)"), rolled.stderr
    assert "ev-roll now serves 1" in rolled.stdout
    assert server.invoke("ev-roll/echo", 0).headers["X-Dockyard-Version"] == "1"
    oldest = server.cli("rollback", "ev-roll", check=False)
    assert one_line_error(oldest) == (
        "Error: ev-roll@1 serves and there is no version before it to roll back to (it is "
        "the oldest version it has); name one: dockyard rollback ev-roll VERSION (dockyard "
        "versions ev-roll lists them)")
    server.cli("rollback", "ev-roll", "3")
    as_json = server.cli("rollback", "ev-roll", "--json")
    assert json.loads(as_json.stdout)["version"] == "1"
    assert "from 3 to 1" in as_json.stderr


def test_rollback_skips_a_version_that_failed_to_deploy_after_a_restart_too(
        private_tmp, wheelhouse, pkg):
    """After a restart no worker has tried the version that failed (it is not wanted
    anywhere): its deployment's record says it failed, and that is what counts."""
    data = private_tmp / "roll-restart" / "data"
    data.parent.mkdir()
    args = ["--find-links", str(wheelhouse), "--offline"]
    server = Server(data, args)
    try:
        for version, extra in (("1", ""), ("2", f'dependencies = ["{MISSING}"]\n'), ("3", "")):
            server.cli("deploy", str(pkg("echo", name="rr", version=version,
                                         manifest_extra=extra)), "--wait",
                       check=version != "2")
        assert server.stop() == 0 and not server.leftovers
        server = Server(data, args)
        listed = server.cli("versions", "rr").stdout
        assert re.search(r"^2\s+failed to deploy\s", listed, re.M), listed
        assert re.search(r"^3\s+serving\s", listed, re.M), listed
        versions = json.loads(server.cli("versions", "rr", "--json").stdout)["versions"]
        assert [(v["version"], v["last_deployment"]["status"]) for v in versions] == [
            ("3", "ready"), ("2", "failed"), ("1", "ready")]
        assert MISSING in versions[1]["last_deployment"]["error"]
        rolled = server.cli("rollback", "rr")
        assert "from 3 to 1, the version before it (skipping 2: failed to deploy)" in \
            rolled.stderr, rolled.stderr
        assert server.invoke("rr/echo", 0).headers["X-Dockyard-Version"] == "1"
    finally:
        if server.proc.poll() is None:
            assert server.stop() == 0, server.log_path.read_text()[-3000:]
        assert not server.leftovers, server.leftovers


# -- invoke -v, --id, @FILE and - -----------------------------------------------------------

def test_invoke_verbose_id_and_events_from_files(server, pkg, tmp_path):
    server.cli("deploy", str(pkg("echo", name="ev-invoke", version="1")), "--wait")
    worker = server.api("GET", "/api/workers").json()["workers"][0]["name"]
    done = server.cli("invoke", "ev-invoke/echo", '{"a": 1}', "-v")
    assert json.loads(done.stdout) == {"a": 1}
    line = done.stderr.splitlines()[-1]
    match = re.fullmatch(r"invocation (inv_[0-9a-f]+)  version 1  duration [0-9.]+ ms  "
                         rf"worker {re.escape(worker)}", line)
    assert match, done.stderr
    assert done.stderr.splitlines()[0] == f"server: {server.url}, from DOCKYARD_URL"
    record = server.api("GET", f"/api/invocations/{match.group(1)}").json()
    assert record["input"] == {"a": 1} and record["status"] == "succeeded"
    # The same with --verbose before the verb.
    assert "  version 1  " in server.cli("--verbose", "invoke", "ev-invoke/echo").stderr
    # --id: the id alone on stderr, the result alone on stdout.
    ided = server.cli("invoke", "--id", "ev-invoke/echo", '"x"')
    assert ided.stdout == '"x"\n' and re.fullmatch(r"inv_[0-9a-f]+\n", ided.stderr)
    assert "succeeded" in server.cli("logs", ided.stderr.strip()).stdout
    # A failed call: its details, then the one-line error.
    failed = server.cli("invoke", "-v", "ev-invoke/boom", check=False)
    assert failed.returncode == 1 and "  version 1  " in failed.stderr
    assert failed.stderr.splitlines()[-1].startswith("Error: ValueError: boom")
    # The event from a file, or from stdin.
    event = tmp_path / "event.json"
    event.write_text('{"from": "file"}')
    assert json.loads(server.cli("invoke", "ev-invoke/echo", f"@{event}").stdout) == {
        "from": "file"}
    assert json.loads(server.cli("invoke", "ev-invoke/echo", "-",
                                 input='{"from": "stdin"}').stdout) == {"from": "stdin"}
    missing = server.cli("invoke", "ev-invoke/echo", f"@{tmp_path / 'nope.json'}",
                         check=False)
    assert f"cannot read the event from {tmp_path / 'nope.json'}" in one_line_error(missing)
    event.write_text("{nope")
    assert "not valid JSON" in one_line_error(
        server.cli("invoke", "ev-invoke/echo", f"@{event}", check=False))


# -- jobs edit ------------------------------------------------------------------------------

def test_jobs_edit_changes_what_it_is_given(server, pkg):
    server.cli("deploy", str(pkg("echo", name="ev-edit", version="1")), "--wait")
    server.cli("jobs", "add", "ev-edit-job", "ev-edit/echo", "@every 1h", "--payload", '"a"',
               "--timeout", "5")
    again = cli_run(server, "jobs", "add", "ev-edit-job", "ev-edit/echo", "@every 2h",
                    check=False)
    assert one_line_error(again) == (
        "Error: Conflict: a job named 'ev-edit-job' exists already; change it with `dockyard "
        "jobs edit ev-edit-job` (PATCH /api/jobs/ev-edit-job) or remove it first")
    out = server.cli("jobs", "edit", "ev-edit-job", "--schedule", "0 6 * * *", "--payload",
                     '{"b": 2}', "--timezone", "Europe/Berlin").stdout
    assert out.startswith("job ev-edit-job changed (payload, schedule, timezone): At 06:00 "
                          "every day (Europe/Berlin time)"), out
    assert re.search(r"next fire: \d{4}-\d\d-\d\d 06:00:00 CES?T \(", out), out
    job = server.api("GET", "/api/jobs/ev-edit-job").json()
    assert (job["schedule"], job["timezone"], job["payload"]) == (
        "0 6 * * *", "Europe/Berlin", {"b": 2})
    assert job["timeout_s"] == 5 and job["target"] == "ev-edit/echo"   # untouched
    edited = json.loads(server.cli("jobs", "edit", "ev-edit-job", "--timeout", "none",
                                   "--retries", "2", "--target", "ev-edit/aecho",
                                   "--json").stdout)
    assert edited["timeout_s"] is None and edited["retries"] == 2
    assert edited["target"] == "ev-edit/aecho" and edited["payload"] == {"b": 2}
    assert "say what to change" in one_line_error(
        server.cli("jobs", "edit", "ev-edit-job", check=False))
    assert "never fires" in one_line_error(
        server.cli("jobs", "edit", "ev-edit-job", "--schedule", "0 0 30 2 *", check=False))
    assert "no job named 'ev-nope'" in one_line_error(
        server.cli("jobs", "edit", "ev-nope", "--retries", "1", check=False))


# -- aliases --------------------------------------------------------------------------------

def test_aliases_are_listed_set_and_removed_from_the_cli(server, pkg):
    for version in ("1", "2"):
        server.cli("deploy", str(pkg("echo", name="ev-al", version=version)), "--wait")
    assert "ev-al has no aliases" in server.cli("aliases", "ev-al").stdout
    made = server.cli("aliases", "set", "ev-al", "live", "1", "--description", "what ships")
    assert made.stdout == "ev-al@live -> 1\n"
    assert server.invoke("ev-al@live/echo", 0).headers["X-Dockyard-Version"] == "1"
    # All of its calls to 2 through the extra version's share, then the share ended.
    split = server.cli("aliases", "set", "ev-al", "live", "--extra", "2=100%")
    assert split.stdout == "ev-al@live -> 1 0% · 2 100%\n"
    assert server.invoke("ev-al@live/echo", 0).headers["X-Dockyard-Version"] == "2"
    listed = server.cli("aliases", "ev-al").stdout.splitlines()
    assert listed[0].split() == ["ALIAS", "VERSIONS", "CHANGED", "DESCRIPTION"]
    assert listed[1].startswith("live") and "1 0% · 2 100%" in listed[1] and \
        listed[1].endswith("what ships"), listed
    assert "  aliases     live -> 1 0% · 2 100%" in server.cli("status", "ev-al").stdout
    assert server.cli("aliases", "set", "ev-al", "live", "--extra", "").stdout == \
        "ev-al@live -> 1\n"
    as_json = json.loads(server.cli("--json", "aliases", "ls", "ev-al").stdout)
    assert [(a["name"], a["version"], a["extra"]) for a in as_json["aliases"]] == [
        ("live", "1", {})]
    # What cannot be: one line each, nothing changed.
    for args, said in (
            (["aliases", "set", "ev-al", "beta"], "say what ALIAS names"),
            (["aliases", "set", "ev-al", "beta", "--extra", "2=5%"],
             "alias 'beta' of 'ev-al' does not exist yet: say the version it names"),
            (["aliases", "set", "ev-al", "beta", "9"], "container 'ev-al' has no version '9'"),
            (["aliases", "set", "ev-al", "1", "2"], "(and not digits only)"),
            (["aliases", "set", "ev-al", "bad.name", "1"], "alias name 'bad.name' is not"),
            (["aliases", "set", "ev-nope", "live", "1"], "no container named 'ev-nope'"),
            (["aliases", "ev-nope"], "no container named 'ev-nope'")):
        refused = cli_run(server, *args, check=False)
        assert refused.returncode in (1, 2) and said in refused.stderr, (args, refused.stderr)
    assert [a["name"] for a in server.api("GET", "/api/containers/ev-al/aliases").json()[
        "aliases"]] == ["live"]
    assert server.cli("aliases", "rm", "ev-al", "live").stdout == "ev-al@live removed\n"
    assert server.invoke("ev-al@live/echo", 0).status_code == 404
    again = cli_run(server, "aliases", "rm", "ev-al", "live", check=False)
    assert one_line_error(again) == ("Error: NotFound: container 'ev-al' has no alias 'live'; "
                                     "`dockyard aliases ev-al` lists them")
