"""The web pages in a real browser: Debian's Chromium, headless, driven by
selenium through Debian's chromedriver, against the real uvicorn server and a
real ZooKeeper. Screenshots go to the test's directory (printed on failure).

The status page shows a running and a finished build and updates live; the
console page follows a running build's output line by line until it ends; a
build page opens from the history and leads to its error line.
"""

from __future__ import annotations

import shutil
import time
import uuid as uuidlib
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from launcher.ansible import OutputLog
from launcher.console import ConsoleServer
from nodepool_lite.zk import ZooKeeper
from tests.test_web import queue_item, store_item
from tests.test_web_history import site  # noqa: F401 (a fixture)
from zuul_lite.state import ZuulState

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT = 30


@pytest.fixture
def browser(tmp_path: Path):
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.fail(
            "chromium and chromium-driver are missing: ./tools/quickstart.sh test installs them"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,900",
        f"--user-data-dir={tmp_path / 'chromium'}",
    ):
        options.add_argument(flag)
    # An explicit driver path: selenium-manager would try to download one.
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()


def shot(driver: webdriver.Chrome, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")


def text_shows(driver: webdriver.Chrome, selector: str, text: str) -> None:
    WebDriverWait(driver, WAIT).until(
        lambda d: any(text in e.text for e in d.find_elements(By.CSS_SELECTOR, selector)),
        f"{text!r} never showed in {selector}",
    )


def test_status_page_with_a_running_and_a_finished_build_then_its_console(
    zk: ZooKeeper, web, browser, tmp_path: Path
) -> None:
    outputs: dict[str, OutputLog] = {}
    console = ConsoleServer(outputs.get)
    console.start()
    try:
        now = time.time()
        running = queue_item("u1", 3, now - 95, start_time=now - 80)
        running["buildset"]["builds"]["kernel-build"]["uuid"] = uuidlib.uuid4().hex
        finished = queue_item(
            "u2", 4, now - 100, state="completed", result="SUCCESS", elapsed=42.0,
            log_url="/logs/4/1/check/kernel-build/u2/",
        )  # fmt: skip
        build = running["buildset"]["builds"]["kernel-build"]["uuid"]
        output = outputs[build] = OutputLog(tmp_path / "job-output.txt")
        output.write("PLAYBOOK [run] kernel-build.yaml")
        ZuulState(zk).claim_build(build, "l1", console.address)
        store_item(zk, "check", finished)
        store_item(zk, "check", running)

        browser.get(web.url + "/")
        text_shows(browser, "#pipelines", "Fix 3")
        text_shows(browser, "#pipelines", "SUCCESS")
        page = browser.find_element(By.ID, "pipelines").text
        assert "Fix 4" in page and "42s" in page
        shot(browser, tmp_path, "status")

        # Live: a third change appears without a reload.
        store_item(zk, "check", queue_item("u3", 5, now))
        text_shows(browser, "#pipelines", "Fix 5")
        assert "Live" in browser.find_element(By.ID, "updated").text

        # The live page re-renders the list: a link found may be replaced
        # before the click lands (stale); find it again until a click does.
        WebDriverWait(browser, WAIT, ignored_exceptions=(StaleElementReferenceException,)).until(
            lambda d: d.find_element(By.LINK_TEXT, "console").click() or True
        )
        text_shows(browser, "#console", "PLAYBOOK [run] kernel-build.yaml")
        output.write("  CC      kernel/fork.o")
        text_shows(browser, "#console", "kernel/fork.o")
        shot(browser, tmp_path, "console")
        output.write("RUN END RESULT_NORMAL")
        output.finish()
        text_shows(browser, "#console-state", "The build has ended")
        assert "RUN END RESULT_NORMAL" in browser.find_element(By.ID, "console").text
    finally:
        console.stop()


@pytest.fixture
def history(site):  # noqa: F811 (tests/test_web_history.py's: two builds, one failed)
    return site


def test_build_page_from_the_history_and_its_output(history, browser, tmp_path: Path) -> None:
    """From /builds to a failed build's page (first error lines, the
    reproduce command, the log tree), then to the error line in its output."""
    server, uuid, _ = history
    browser.get(server.url + "/builds?result=FAILURE")
    browser.find_element(By.CSS_SELECTOR, f'a[href="/build/{uuid}"]').click()
    text_shows(browser, "main", "undeclared <script>")  # shown as text, not run
    page = browser.find_element(By.TAG_NAME, "main").text
    assert "make -j2 W=1 fs/foo.o" in page and "job-output.txt" in page
    shot(browser, tmp_path, "build")
    browser.find_element(By.CSS_SELECTOR, f'a[href="/build/{uuid}/output#L2"]').click()
    WebDriverWait(browser, WAIT).until(lambda d: d.current_url.endswith("#L2"))
    line = browser.find_element(By.ID, "L2")
    assert "error" in line.get_attribute("class") and "undeclared" in line.text
    shot(browser, tmp_path, "output")
