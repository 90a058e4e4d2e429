"""The status page at ``/`` of the admin address, in a real headless browser (Debian's chromium,
driven through /usr/bin/chromedriver by Selenium): it renders the fleet and its node, and an
Envoy's rejection appears on it without a reload, its text shown as text."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.controlplane.test_controlplane_hardening import builtin_policy  # AuthPolicy 'decide'
from tests.support.http import get, request
from tests.support.policies import backend, documents, gateway, write_policies
from tests.support.ports import free_port, wait_for
from tests.support.processes import ServeProcess, start_envoys

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
HOSTILE = '<img id="injected" src=x>'
"""Part of a policy file name: shown on the page as these characters, never as an element."""


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc), to stop the browser by PID after chromedriver."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found += [int(p) for p in (task / "children").read_text().split()]
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] not in ("Z", "X")
    except OSError:
        return False


def stop_pid(pid: int, timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL if ``pid`` still runs after ``timeout`` (quit normally stopped it)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not alive(pid):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[object]:
    """Headless chromium through Debian's chromedriver; Selenium Manager never runs (the driver's
    path is given), nothing is downloaded, and the browser talks only to the test's servers."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: install Debian's chromium and chromium-driver "
                    "(apt-get install -y chromium chromium-driver; .ci/run does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1440,900"):
        options.add_argument(flag)
    service = Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver_pid = service.process.pid
    browser_pids = children(driver_pid)
    try:
        yield driver
    finally:
        driver.quit()
        for pid in (*browser_pids, driver_pid):
            stop_pid(pid)
        service.process.wait(10)


def artifact_dir(tmp_path: Path) -> Path:
    where = Path(os.environ.get("AUTHPLANE_TEST_ARTIFACTS") or tmp_path)
    where.mkdir(parents=True, exist_ok=True)
    return where


@pytest.mark.parametrize("workers", [0, 1])
def test_status_page_shows_the_fleet_and_a_nack_without_a_reload(tmp_path, processes, echo, browser, workers):
    """Decision rates come from the decision service's registry in-process (0) and from the
    workers' multiprocess metrics (1)."""
    from selenium.webdriver.common.by import By

    envoys, serves = processes
    port, grpc_port, http_port = free_port(), free_port(), free_port()
    d = write_policies(str(tmp_path / "policies"), {"gateway.yaml": documents(
        gateway("edge", port), backend("echo", echo.port), "kind: Route\nmetadata: {name: app}\n"
        "spec: {gateway: edge, rules: [{name: open, backend: echo}]}"), "decide.yaml": builtin_policy()})
    serves.append(serve := ServeProcess(
        d, str(tmp_path), 0, "--authz-grpc", f"127.0.0.1:{grpc_port}", "--authz-http", f"127.0.0.1:{http_port}",
        "--authz-grpc-listen", f"127.0.0.1:{grpc_port}", "--authz-http-listen", f"127.0.0.1:{http_port}",
        "--authz-workers", str(workers)).wait_started())
    envoys += start_envoys(str(tmp_path), serve.xds, [("edge-1", "edge", True)])
    serve.wait_in_sync("edge-1")
    version = serve.status()["fleets"]["edge"]["version"]
    assert "<script>" in get(f"http://{serve.address}/")  # served without the browser, too

    def text(element_id: str) -> str:
        return browser.find_element(By.ID, element_id).text

    browser.get(f"http://{serve.address}/")
    wait_for(lambda: "edge" in text("fleets") and version in text("fleets"), "the fleet on the page", 20)
    wait_for(lambda: "edge-1" in text("nodes") and "in sync" in text("nodes"), "the node in sync on the page")
    assert version in text("nodes")  # acked per type
    assert "changed" in text("reloads")  # the start-up load
    assert "None: every change was accepted." in text("problem-list")
    assert text("policy-dir") == d
    assert [request(port, "/x").status, request(port, "/x", headers={"x-pass": "one"}).status] == [403, 200]

    def decisions() -> bool:
        rows = {r.split()[0]: r.split()[1:] for r in text("decisions").split("\n")[1:]}
        return rows.get("decide", [])[-2:] == ["1", "1"]  # allowed, denied

    wait_for(decisions, "the decisions of policy 'decide' on the page")
    browser.execute_script("window.sameDocument = true;")

    # Valid for authplane, rejected by Envoy: a listener address it cannot bind, in a policy file
    # whose name is markup.
    bad_path = os.path.join(d, f"bad{HOSTILE}.yaml")
    write_policies(d, {os.path.basename(bad_path): documents(
        gateway("bad", free_port(), fleet="edge").replace("127.0.0.1", "192.0.2.1"),
        "kind: Route\nmetadata: {name: bad}\nspec: {gateway: bad, rules: [{name: open, backend: echo}]}")})
    source = f"Gateway 'bad' ({bad_path}:1:1)"

    def nack_shown() -> bool:
        problems = text("problem-list")
        return "Envoy rejects listeners" in problems and "192.0.2.1" in problems and source in problems

    wait_for(nack_shown, "the NACK, its message and the rejected resource's file:line on the page", 30)
    assert browser.execute_script("return window.sameDocument === true;"), "the page was reloaded"
    assert browser.find_elements(By.ID, "injected") == []  # the file name stayed text
    assert "rejected" in text("nodes")
    rejection = serve.node("edge-1")["last_rejection"]
    assert browser.find_element(By.CSS_SELECTOR, ".envoy-message").get_property("textContent") == \
        rejection["error_detail"]
    wait_for(lambda: text("reloads").count("changed") == 2, "the reload of the bad file in the history")

    shot = artifact_dir(tmp_path) / f"status-page-nack-workers-{workers}.png"
    assert browser.save_screenshot(str(shot)), "no screenshot"
    print(f"status page screenshot: {shot}")
