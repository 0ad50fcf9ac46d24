"""The dashboard in a real browser: Debian's headless Chromium, driven by Selenium through
Debian's chromedriver (nothing downloads a browser), against a real `dockyard serve`. Without
them the tests skip, naming what to install; under CI=true they fail instead. Each test saves
a screenshot into its temp folder when it fails."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import requests

from conftest import ROOT, Server, make_package

if os.environ.get("CI") == "true" and not (shutil.which("chromium")
                                          and shutil.which("chromedriver")):
    # A fresh CI machine: the test run sets it up (as root with apt-get), or says why not.
    from devtools.packages import install
    install("chromium", "chromium-driver")
CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
INSTALL = ("the browser tests need Debian's chromium and chromium-driver: "
           "apt-get install -y chromium chromium-driver (and selenium: pip install -e '.[test]')")
WAIT_S = 30


def _missing() -> bool:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return True
    return not (CHROMIUM and CHROMEDRIVER)


if _missing():
    if os.environ.get("CI") == "true":
        pytest.fail(INSTALL, pytrace=False)
    pytest.skip(INSTALL, allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def dashboard_server(private_tmp, wheelhouse):
    data = private_tmp / "ui-browser" / "data"
    data.parent.mkdir()
    srv = Server(data, ["--find-links", str(wheelhouse), "--offline"])
    try:
        srv.deploy(ROOT / "deploy" / "hello")
        yield srv
    finally:
        code = srv.stop()
    assert code == 0, srv.log_path.read_text()[-3000:]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    os.environ.setdefault("SE_OFFLINE", "true")   # Selenium Manager never fetches anything
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1366,900",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def page(browser, dashboard_server, tmp_path):
    """The browser, signed in, with a screenshot in tmp_path if the test fails."""
    browser.delete_all_cookies()
    sign_in(browser, dashboard_server.url, dashboard_server.admin)
    with screenshot_on_failure(browser, tmp_path):
        yield browser


@contextlib.contextmanager
def screenshot_on_failure(driver, folder: Path):
    try:
        yield
    except BaseException:
        shot = folder / "failure.png"
        with contextlib.suppress(Exception):
            driver.save_screenshot(str(shot))
            print(f"screenshot of the failure: {shot}")
        raise


def docs_screenshot(driver, url: str, name: str) -> None:
    """With DOCKYARD_UI_SCREENSHOTS=FOLDER, a screenshot of the page at `url` for the docs
    (the README's are made with DOCKYARD_UI_SCREENSHOTS=docs)."""
    folder = os.environ.get("DOCKYARD_UI_SCREENSHOTS")
    if not folder:
        return
    driver.get(url)
    wait(driver, EC.presence_of_element_located((By.ID, "sign-out")))
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1366, max(700, min(height + 20, 2400)))
    try:
        driver.save_screenshot(str(ROOT / folder / name))
    finally:
        driver.set_window_size(1366, 900)


def wait(driver, condition, timeout: float = WAIT_S):
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)


def text_in(driver, selector: str, text: str, timeout: float = WAIT_S):
    return wait(driver, EC.text_to_be_present_in_element((By.CSS_SELECTOR, selector), text),
                timeout)


def sign_in(driver, url: str, token: str) -> None:
    driver.get(url + "/ui/")
    field = wait(driver, EC.presence_of_element_located((By.ID, "token")))
    assert field.get_attribute("type") == "password"
    field.send_keys(token)
    driver.find_element(By.ID, "sign-in").click()
    wait(driver, EC.presence_of_element_located((By.ID, "sign-out")))


def test_sign_in_overview_and_sign_out(browser, dashboard_server, tmp_path):
    browser.delete_all_cookies()
    with screenshot_on_failure(browser, tmp_path):
        browser.get(dashboard_server.url + "/ui/")
        wait(browser, EC.presence_of_element_located((By.ID, "token"))).send_keys("wrong")
        browser.find_element(By.ID, "sign-in").click()
        text_in(browser, "#sign-in-error", "wrong token")
        sign_in(browser, dashboard_server.url, dashboard_server.admin)
        link = wait(browser, EC.presence_of_element_located(
            (By.CSS_SELECTOR, "a.container-link[href='/ui/containers/hello']")))
        assert link.text == "hello"
        # The server's zone beside the browser's, filled in by the page's script.
        wait(browser, lambda d: d.find_element(By.ID, "browser-zone").text not in ("", "—"))
        cookie = browser.get_cookie("dockyard_ui")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert browser.execute_script("return document.cookie") == ""
        browser.find_element(By.ID, "sign-out").click()
        wait(browser, EC.presence_of_element_located((By.ID, "token")))
        browser.get(dashboard_server.url + "/ui/containers")
        wait(browser, EC.presence_of_element_located((By.ID, "token")))


def test_invoke_from_the_container_page(page, dashboard_server):
    url = dashboard_server.url
    page.get(url + "/ui/containers/hello")
    form = wait(page, EC.presence_of_element_located(
        (By.CSS_SELECTOR, "form.invoke[data-function='greet']")))
    form.find_element(By.NAME, "event").send_keys('{"who": "browser"}')
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    # The call's page follows it until its answer, without a reload.
    text_in(page, "#result", "hello, browser!")
    assert "greeting browser" in page.find_element(By.ID, "stdout").text
    invocation_id = page.current_url.rsplit("/", 1)[1]
    page.get(url + "/ui/invocations?container=hello")
    link = wait(page, EC.presence_of_element_located(
        (By.CSS_SELECTOR, f"a[href='/ui/invocations/{invocation_id}']")))
    link.click()
    text_in(page, "#result", "hello, browser!")
    assert '"who": "browser"' in page.find_element(By.ID, "event").text
    docs_screenshot(page, url + "/ui/", "dashboard-overview.png")
    docs_screenshot(page, url + "/ui/containers/hello", "dashboard-container.png")


def test_a_job_run_now_appears_without_a_reload(page, dashboard_server):
    answer = dashboard_server.api("POST", "/api/jobs", json={
        "name": "ui-often", "target": "hello/greet", "schedule": "@every 1h",
        "payload": {"who": "job"}})
    assert answer.status_code == 201, answer.text
    page.get(dashboard_server.url + "/ui/jobs")
    link = wait(page, EC.presence_of_element_located((By.LINK_TEXT, "ui-often")))
    row = link.find_element(By.XPATH, "./ancestor::tr")
    assert "Every 1 hour" in row.text and "in 59 min" in row.text
    link.click()
    wait(page, EC.element_to_be_clickable((By.ID, "run-now"))).click()
    text_in(page, ".flash", "run queued as")
    page.execute_script("window.notReloaded = true")
    text_in(page, "#runs table.runs", "succeeded")
    assert page.execute_script("return window.notReloaded") is True
    assert page.find_elements(By.CSS_SELECTOR, "#runs .grid .box.s-succeeded")


def test_cancel_a_running_call(page, dashboard_server, tmp_path):
    dashboard_server.deploy(make_package(tmp_path, "echo", name="ui-slow"))
    answers: list = []
    caller = threading.Thread(target=lambda: answers.append(
        dashboard_server.invoke("ui-slow/print_then_sleep", {"s": 60})))
    caller.start()
    try:
        page.get(dashboard_server.url + "/ui/")
        # The running calls refresh by themselves: the call shows up without a reload.
        button = wait(page, EC.element_to_be_clickable(
            (By.CSS_SELECTOR, "#running button[data-cancel]")))
        invocation_id = button.get_attribute("data-cancel")
        button.click()
        text_in(page, ".flash", f"{invocation_id}: cancelled")
        caller.join(timeout=WAIT_S)
        assert not caller.is_alive() and answers[0].status_code == 409
        page.get(dashboard_server.url + f"/ui/invocations/{invocation_id}")
        text_in(page, "#inv-status", "cancelled")
    finally:
        caller.join(timeout=90)


def test_a_failed_deploy_shows_its_build_log(page, dashboard_server, tmp_path):
    record = dashboard_server.deploy(make_package(tmp_path, "broken_import", name="ui-broken"),
                                     expect="failed")
    page.get(dashboard_server.url + "/ui/containers/ui-broken")
    link = wait(page, EC.presence_of_element_located(
        (By.CSS_SELECTOR, f"a[href='/ui/deployments/{record['deployment']}']")))
    link.click()
    text_in(page, "#deployment-status", "failed")
    log = page.find_element(By.CSS_SELECTOR, ".build-log").text
    assert log.strip() and log != "(no build log yet)"
