"""The dashboard's routes, in-process (Flask's test client over a real data dir): sign-in and
sessions, every page, every action through the API's own functions, CSRF, 404s, and paging
over 100 000 invocation records (with the page-load times printed, not asserted)."""

from __future__ import annotations

import io
import json
import re
import sqlite3
import time
import zipfile

import pytest

from dockyard.app import create_app

PAGES = ["/ui/", "/ui/containers", "/ui/invocations", "/ui/jobs", "/ui/workers",
         "/ui/deploy-folder"]


def package(name: str, version: str, extra: str = "") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("dockyard.toml", f'name = "{name}"\nversion = "{version}"\n\n[functions]\n'
                                     f'greet = "main:greet"\n{extra}')
        zf.writestr("main.py", "def greet(event):\n    return {'hi': event}\n")
    return buf.getvalue()


class Dashboard:
    def __init__(self, tmp_path):
        self.data = tmp_path / "data"
        self.app = create_app({"DATA_DIR": str(self.data)})
        self.token = (self.data / "tokens" / "admin").read_text().strip()
        self.client = self.app.test_client()
        self.api = self.app.test_client()
        self.api.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {self.token}"

    def csrf(self, path: str = "/ui/sign-in") -> str:
        page = self.client.get(path)
        return re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)

    def sign_in(self, token: str | None = None):
        return self.client.post("/ui/sign-in", data={"csrf": self.csrf(),
                                                     "token": token or self.token})

    def post(self, path: str, csrf: bool = True, **form):
        if csrf:
            form["csrf"] = self.csrf("/ui/")
        return self.client.post(path, data=form)

    def deploy(self, name: str = "hello", version: str = "1.0", extra: str = "") -> dict:
        answer = self.api.post("/api/containers", data=package(name, version, extra))
        assert answer.status_code in (200, 201), answer.text
        return answer.get_json()

    def worker(self, name: str = "w1") -> str:
        """A worker registered through the API (at an address nothing answers on)."""
        worker_token = (self.data / "tokens" / "worker").read_text().strip()
        answer = self.app.test_client().post(
            "/api/workers/register", json={"name": name, "address": "127.0.0.1:9",
                                           "hostname": "testhost", "pid": 1},
            headers={"Authorization": f"Bearer {worker_token}"})
        assert answer.status_code == 201, answer.text
        return answer.get_json()["id"]

    def sql(self, statement: str, args=()):
        with sqlite3.connect(self.data / "dockyard.db") as conn:
            return conn.execute(statement, args).fetchall()


@pytest.fixture
def ui(tmp_path):
    return Dashboard(tmp_path)


@pytest.fixture
def signed_in(ui):
    assert ui.sign_in().status_code == 302
    return ui


def test_pages_need_a_session(ui):
    for path in PAGES + ["/ui/containers/hello", "/ui/invocations/inv_x"]:
        answer = ui.client.get(path)
        assert answer.status_code == 302, path
        assert answer.headers["Location"].startswith("/ui/sign-in?next=")
        # What the live parts fetch is refused, not redirected.
        assert ui.client.get(path, headers={"X-Dockyard-Refresh": "1"}).status_code == 401
    # The style sheet and script serve no data: they load on the sign-in page.
    assert ui.client.get("/ui/static/ui.css").status_code == 200
    assert ui.client.get("/ui/static/ui.js").status_code == 200


def test_sign_in_with_the_admin_token(ui):
    page = ui.client.get("/ui/sign-in")
    assert '<input type="password" name="token"' in page.text
    wrong = ui.sign_in("not-the-token")
    assert wrong.status_code == 401
    assert "wrong token: this is not the server&#39;s admin token" in wrong.text
    assert str(ui.data / "tokens" / "admin") in wrong.text
    assert ui.client.get("/ui/").status_code == 302
    # No CSRF token: refused, and not signed in.
    bare = ui.client.post("/ui/sign-in", data={"token": ui.token})
    assert bare.status_code == 400 and "CSRF" in bare.text
    assert ui.client.get("/ui/").status_code == 302

    right = ui.client.post("/ui/sign-in", data={"csrf": ui.csrf(), "token": ui.token,
                                                "next": "/ui/jobs"})
    assert right.status_code == 302 and right.headers["Location"] == "/ui/jobs"
    cookie = right.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/ui" in cookie
    assert ui.token not in cookie
    assert ui.client.get("/ui/").status_code == 200


def test_sign_in_never_sends_elsewhere(ui):
    answer = ui.client.post("/ui/sign-in", data={"csrf": ui.csrf(), "token": ui.token,
                                                 "next": "//evil.example/ui/"})
    assert answer.headers["Location"] == "/ui/"


def test_sign_out_ends_the_session(signed_in):
    ui = signed_in
    assert ui.post("/ui/sign-out", csrf=False).status_code == 400
    assert ui.client.get("/ui/").status_code == 200
    out = ui.post("/ui/sign-out")
    assert out.status_code == 302 and out.headers["Location"] == "/ui/sign-in"
    assert ui.client.get("/ui/").status_code == 302


def test_the_api_keeps_its_bearer_tokens(signed_in):
    # The session opens the dashboard only: the JSON API still wants the token.
    answer = signed_in.client.get("/api/containers")
    assert answer.status_code == 401
    assert signed_in.api.get("/api/containers").status_code == 200


def test_a_session_signed_with_another_admin_token_is_refused(tmp_path, signed_in):
    other = Dashboard(tmp_path / "other")
    cookie = signed_in.client.get_cookie("dockyard_ui", path="/ui")
    other.client.set_cookie("dockyard_ui", cookie.value, path="/ui")
    assert other.client.get("/ui/").status_code == 302


def test_every_page_shows_what_the_store_holds(signed_in):
    ui = signed_in
    worker = ui.worker()
    ui.deploy("hello", "1.0")
    job = ui.api.post("/api/jobs", json={"name": "nightly", "target": "hello/greet",
                                         "schedule": "0 3 * * *",
                                         "timezone": "Europe/Berlin"})
    assert job.status_code == 201, job.text
    t = time.time()
    ui.sql("INSERT INTO invocations (id, container, version, function, trigger, status, "
           "attempt, input, output, stdout, stderr, worker_id, created_at, started_at, "
           "finished_at, duration_ms, max_rss_kb, cold) VALUES (?, 'hello', '1.0', 'greet', "
           "'http', 'succeeded', 1, ?, ?, 'greeting you', 'a warning', 'wrk_1', ?, ?, ?, "
           "12.5, 20480, 1)", ["inv_seen", '{"who": "you"}', '{"hi": {"who": "you"}}', t, t,
                               t + 0.0125])
    overview = ui.client.get("/ui/")
    assert overview.status_code == 200
    assert 'href="/ui/containers/hello"' in overview.text
    assert "Server time zone" in overview.text and 'id="browser-zone"' in overview.text
    assert "12.5 ms" in overview.text   # the p50 of the last hour
    containers = ui.client.get("/ui/containers")
    assert ">hello</a>" in containers.text and "1.0" in containers.text
    page = ui.client.get("/ui/containers/hello")
    assert 'data-function="greet"' in page.text and "main:greet" in page.text
    assert "<svg" in page.text and "1 calls, 0 errors" in page.text
    deployment = re.search(r'href="/ui/deployments/(dep_[^"]+)"', page.text).group(1)
    assert ui.client.get(f"/ui/deployments/{deployment}").status_code == 200
    calls = ui.client.get("/ui/invocations")
    assert "inv_seen" in calls.text
    call = ui.client.get("/ui/invocations/inv_seen")
    for shown in ("greeting you", "a warning", "12.5 ms", "20.0 MB", "wrk_1",
                  "&#34;who&#34;: &#34;you&#34;", "&#34;hi&#34;"):
        assert shown in call.text, shown
    assert "data-refresh" not in call.text   # finished: nothing to follow
    jobs = ui.client.get("/ui/jobs")
    assert "nightly" in jobs.text and "Europe/Berlin" in jobs.text
    assert "At 03:00" in jobs.text and "data-countdown" in jobs.text
    job_page = ui.client.get("/ui/jobs/nightly")
    assert 'id="run-now"' in job_page.text and 'id="pause"' in job_page.text
    workers = ui.client.get("/ui/workers")
    assert worker in workers.text and "testhost" in workers.text and "w1" in workers.text
    assert ui.client.get("/ui/deploy-folder").status_code == 200


@pytest.mark.parametrize("path", ["/ui/containers/nope", "/ui/invocations/inv_nope",
                                  "/ui/jobs/nope", "/ui/deployments/dep_nope"])
def test_unknown_things_are_404s(signed_in, path):
    answer = signed_in.client.get(path)
    assert answer.status_code == 404
    assert "nope" in answer.text and "<html" in answer.text


@pytest.mark.parametrize("path", ["/ui/containers/nope/invoke", "/ui/containers/nope/activate",
                                  "/ui/invocations/inv_nope/cancel", "/ui/jobs/nope/run",
                                  "/ui/jobs/nope/pause", "/ui/jobs/nope/resume"])
def test_actions_on_unknown_things_are_404s(signed_in, path):
    assert signed_in.post(path, function="greet", version="1").status_code == 404


def test_invoke_queues_a_call_and_shows_its_page(signed_in):
    ui = signed_in
    ui.deploy("hello", "1.0")
    answer = ui.post("/ui/containers/hello/invoke", function="greet", event='{"who": "ui"}')
    assert answer.status_code == 302
    invocation_id = answer.headers["Location"].rsplit("/", 1)[1]
    record = ui.api.get(f"/api/invocations/{invocation_id}").get_json()
    assert record["status"] == "queued" and record["input"] == {"who": "ui"}
    assert record["function"] == "greet" and record["trigger"] == "async"
    page = ui.client.get(answer.headers["Location"])
    assert 'data-refresh="1000"' in page.text and "(following)" in page.text
    assert 'data-cancel="' + invocation_id in page.text


def test_a_removed_containers_calls_link_to_no_page_of_it(signed_in):
    ui = signed_in
    ui.deploy("gone", "1.0")
    answer = ui.post("/ui/containers/gone/invoke", function="greet", event="1")
    call_page = answer.headers["Location"]
    link = 'href="/ui/containers/gone"'
    assert link in ui.client.get(call_page).text
    assert link in ui.client.get("/ui/invocations").text
    assert ui.api.delete("/api/containers/gone").status_code == 200
    for path in (call_page, "/ui/invocations"):
        page = ui.client.get(path)
        assert page.status_code == 200 and link not in page.text, path
        assert 'gone <span class="dim">(removed)</span>' in page.text, path


def test_invoke_refusals_are_said_on_the_page(signed_in):
    ui = signed_in
    ui.deploy("hello", "1.0")
    before = ui.sql("SELECT count(*) FROM invocations")[0][0]
    for form, said in (({"function": "greet", "event": "{nope"}, "the event is not valid JSON"),
                       ({"function": "missing", "event": ""}, "missing")):
        answer = ui.post("/ui/containers/hello/invoke", **form)
        assert answer.status_code == 302 and answer.headers["Location"] == "/ui/containers/hello"
        page = ui.client.get("/ui/containers/hello")
        assert 'class="flash error"' in page.text and said in page.text
    assert ui.sql("SELECT count(*) FROM invocations")[0][0] == before
    refused = ui.post("/ui/containers/hello/invoke", csrf=False, function="greet")
    assert refused.status_code == 400
    assert ui.sql("SELECT count(*) FROM invocations")[0][0] == before


def test_cancel_a_queued_call(signed_in):
    ui = signed_in
    ui.deploy("hello", "1.0")
    answer = ui.post("/ui/containers/hello/invoke", function="greet")
    invocation_id = answer.headers["Location"].rsplit("/", 1)[1]
    assert ui.post(f"/ui/invocations/{invocation_id}/cancel", csrf=False).status_code == 400
    assert ui.api.get(f"/api/invocations/{invocation_id}").get_json()["status"] == "queued"
    assert ui.post(f"/ui/invocations/{invocation_id}/cancel",
                   back="/ui/").headers["Location"] == "/ui/"
    assert ui.api.get(f"/api/invocations/{invocation_id}").get_json()["status"] == "cancelled"
    again = ui.post(f"/ui/invocations/{invocation_id}/cancel")
    assert again.status_code == 302
    assert "has finished already" in ui.client.get(again.headers["Location"]).text


def test_activate_an_older_version(signed_in):
    ui = signed_in
    ui.worker()
    ui.deploy("hello", "1.0")
    ui.deploy("hello", "2.0")
    page = ui.client.get("/ui/containers/hello")
    assert 'data-activate="1.0"' in page.text and 'data-activate="2.0"' not in page.text
    assert ui.post("/ui/containers/hello/activate", csrf=False, version="1.0"
                   ).status_code == 400
    assert ui.api.get("/api/containers/hello").get_json()["active_version"] == "2.0"
    assert ui.post("/ui/containers/hello/activate", version="1.0").status_code == 302
    assert ui.api.get("/api/containers/hello").get_json()["active_version"] == "1.0"
    refused = ui.post("/ui/containers/hello/activate", version="9.9")
    assert refused.status_code == 302
    assert "has no version &#39;9.9&#39;" in ui.client.get(refused.headers["Location"]).text


def test_a_traffic_split_shows_on_the_container_page(signed_in):
    ui = signed_in
    ui.deploy("hello", "1.0")
    ui.deploy("hello", "2.0")
    ui.sql("UPDATE containers SET serving_version_id = active_version_id")   # as if ready
    assert "Traffic split" not in ui.client.get("/ui/containers/hello").text
    answer = ui.api.post("/api/containers/hello/traffic", json={"weights": {"1.0": 0.25}})
    assert answer.status_code == 200, answer.text
    page = ui.client.get("/ui/containers/hello").text
    assert re.search(r'Traffic split: <b class="mono">2\.0</b> 75\.0 % · '
                     r'<b class="mono">1\.0</b> 25\.0 %', page), page
    assert "split 25.0 %" in page


def test_run_pause_and_resume_a_job(signed_in):
    ui = signed_in
    ui.deploy("hello", "1.0")
    ui.api.post("/api/jobs", json={"name": "often", "target": "hello/greet",
                                   "schedule": "@every 1h"})
    assert ui.post("/ui/jobs/often/run", csrf=False).status_code == 400
    assert ui.api.get("/api/jobs/often/runs").get_json()["runs"] == []
    assert ui.post("/ui/jobs/often/run").status_code == 302
    runs = ui.api.get("/api/jobs/often/runs").get_json()["runs"]
    assert [r["trigger"] for r in runs] == ["manual"]
    page = ui.client.get("/ui/jobs/often")
    assert runs[0]["invocation_id"] in page.text and "run queued as" in page.text
    call = ui.client.get(f"/ui/invocations/{runs[0]['invocation_id']}")
    assert 'id="job-link">often</a>' in call.text
    assert ui.post("/ui/jobs/often/pause", csrf=False).status_code == 400
    assert ui.api.get("/api/jobs/often").get_json()["enabled"] is True
    assert ui.post("/ui/jobs/often/pause").status_code == 302
    assert ui.api.get("/api/jobs/often").get_json()["enabled"] is False
    assert 'id="resume"' in ui.client.get("/ui/jobs/often").text
    assert ui.post("/ui/jobs/often/resume").status_code == 302
    assert ui.api.get("/api/jobs/often").get_json()["enabled"] is True


# -- 100 000 records -------------------------------------------------------------------------

RECORDS = 100_000
STATUSES = ["succeeded"] * 8 + ["failed", "timed_out"]


def seed(ui: Dashboard, n: int = RECORDS) -> None:
    """n finished calls over the last 24 h, to three containers, 10 % failed or timed out."""
    t = time.time()
    rows = []
    for i in range(n):
        created = t - 86000 * (n - i) / n
        rows.append((f"inv_{int(created * 1000):012x}{i:012x}", f"c{i % 3}", "1.0",
                     "greet" if i % 2 else "echo", "http" if i % 5 else "cron",
                     STATUSES[i % 10], 1, '{"n": %d}' % i, created, created,
                     created + 0.01, 1 + i % 97, 10240))
    with sqlite3.connect(ui.data / "dockyard.db") as conn:
        conn.executemany(
            "INSERT INTO invocations (id, container, version, function, trigger, status, "
            "attempt, input, created_at, started_at, finished_at, duration_ms, max_rss_kb) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)


def ids_on(page_text: str) -> list[str]:
    return re.findall(r'href="/ui/invocations/(inv_[0-9a-f]+)"', page_text)


def test_paging_over_100_000_records(signed_in):
    ui = signed_in
    seed(ui)
    seen: list[str] = []
    path = "/ui/invocations?container=c1&status=failed"
    for _ in range(4):
        page = ui.client.get(path)
        ids = ids_on(page.text)
        assert len(ids) == 50
        seen += ids
        path = re.search(r'href="([^"]+)" id="older"', page.text).group(1).replace("&amp;", "&")
    assert len(set(seen)) == len(seen) == 200
    assert seen == sorted(seen, reverse=True)   # ids are time-ordered: newest first
    rows = dict(ui.sql(f"SELECT id, container || '/' || status FROM invocations WHERE id IN "
                       f"({', '.join('?' * len(seen))})", seen))
    assert set(rows.values()) == {"c1/failed"}
    # The last page: no "older" link.
    oldest = ui.sql("SELECT created_at, id FROM invocations ORDER BY created_at, id LIMIT 3")
    last = ui.client.get(f"/ui/invocations?before={oldest[2][0]!r}~{oldest[2][1]}")
    assert ids_on(last.text) == [oldest[1][1], oldest[0][1]]
    assert 'id="older"' not in last.text and 'id="newest"' in last.text
    window = ui.client.get("/ui/invocations?window=15m&trigger=cron&function=echo")
    assert window.status_code == 200 and 0 < len(ids_on(window.text)) <= 50
    assert ui.client.get("/ui/invocations?status=nope").status_code == 400
    bad_trigger = ui.client.get("/ui/invocations?trigger=zzz")
    assert bad_trigger.status_code == 400 and "trigger must be one of http" in bad_trigger.text
    assert ui.client.get("/ui/invocations?before=junk").status_code == 400


def test_page_load_times_with_100_000_records(signed_in, capsys):
    """Prints how long each page takes over 100 000 records (run with -s to read it)."""
    ui = signed_in
    ui.deploy("c1", "1.0")
    seed(ui)
    newest = ui.sql("SELECT id FROM invocations ORDER BY created_at DESC LIMIT 1")[0][0]
    middle = ui.sql("SELECT created_at, id FROM invocations ORDER BY created_at "
                    "LIMIT 1 OFFSET 50000")[0]
    figures = []
    for path in ["/ui/", "/ui/containers", "/ui/containers/c1", "/ui/invocations",
                 "/ui/invocations?container=c2&status=timed_out",
                 f"/ui/invocations?before={middle[0]!r}~{middle[1]}",
                 "/ui/invocations?function=echo&trigger=cron&window=1h",
                 f"/ui/invocations/{newest}", "/ui/jobs", "/ui/workers"]:
        assert ui.client.get(path).status_code == 200, path   # warm the connection
        times = []
        for _ in range(5):
            start = time.perf_counter()
            answer = ui.client.get(path)
            times.append((time.perf_counter() - start) * 1000)
            assert answer.status_code == 200
        figures.append((path, sorted(times)[2]))
    with capsys.disabled():
        print(f"\npage load with {RECORDS} invocation records (median of 5, ms):")
        for path, ms in figures:
            print(f"  {ms:8.1f}  {path}")
