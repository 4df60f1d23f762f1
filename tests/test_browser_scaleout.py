"""The demo page behind haproxy (deploy/haproxy.cfg) with two `vident serve` replicas, in headless Chromium:
the replica serving the page's session is killed with SIGKILL, and the page reconnects to the other one,
starts a new stream there and counts what was lost. Real processes; skips like tests/test_browser.py."""

from __future__ import annotations

from pathlib import Path

from real_servers import balanced_replicas
from test_browser import _wait, driver  # noqa: F401 - driver is the module's headless Chromium fixture


def test_the_page_reconnects_to_the_other_replica(driver, tmp_path: Path) -> None:  # noqa: F811
    from selenium.webdriver.common.by import By

    with balanced_replicas(tmp_path) as replicas:
        driver.get(replicas.url + "/")
        text = lambda element_id: driver.find_element(By.ID, element_id).text  # noqa: E731
        _wait(lambda: text("status") == "ready", 60, "the page to initialise")
        driver.find_element(By.ID, "start").click()
        _wait(lambda: int(text("processed")) >= 3, 120, f"3 processed frames (status: {text('status')!r})")
        sessions = replicas.sessions()
        assert sorted(sessions) == [0, 1], sessions
        victim, survivor = (0, 1) if sessions[0] == 1 else (1, 0)
        replicas.processes[victim].kill()
        before = int(text("processed"))
        _wait(lambda: text("reconnects") == "1", 60, f"a reconnection (status: {text('status')!r})")
        _wait(lambda: int(text("processed")) >= before + 3, 120, "frames from the new stream")
        assert replicas.sessions(survivor) == [1]
        assert int(text("lost")) >= 0 and text("errors") == "0", driver.find_element(By.ID, "log").text
        assert "closed" not in text("status"), text("status")  # still streaming, not stopped
        driver.find_element(By.ID, "stop").click()
