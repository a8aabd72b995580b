"""The review station in a real browser (headless Chromium through Selenium), end to end.

The daemon's runtime runs in full (DICOM SCP, MLLP listener, scheduler, outbox) behind
uvicorn; an order and a capture arrive over the network, the preliminary result reaches the
LIS simulator, a technologist reclassifies cells by click and by keyboard, a pathologist
signs the case out, and the LIS receives the final result with the changed values.
Screenshots of the worklist and the case page go to ``test-artifacts/``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from review_support import (
    PASSWORD,
    GroundTruthDetector,
    ReviewRuntime,
    ServerThread,
    free_port,
    obx_values,
    review_capture,
)
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.wait import WebDriverWait

from lisplugin.config import Settings
from lisplugin.dicom.scu import send
from lisplugin.hl7.lis_sim import LisSimulator, build_test_order
from lisplugin.hl7.mllp import send_message
from lisplugin.http.app import create_app
from lisplugin.service.pipeline import Pipeline
from lisplugin.service.users import hash_password
from lisplugin.storage.orm_review import Role, User

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
        reason="needs Debian's chromium and chromium-driver (/usr/bin/chromium, chromedriver)",
    ),
]


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1440,1000",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def station(tmp_path: Path) -> Iterator[tuple[LisSimulator, str]]:
    """The whole daemon on free loopback ports, with two cases waiting for review."""
    yield from run_station(tmp_path)


@pytest.fixture
def two_stage_station(tmp_path: Path) -> Iterator[tuple[LisSimulator, str]]:
    """The same, with the two-stage review (technologist, then pathologist)."""
    yield from run_station(tmp_path, review={"two_stage": True})


def run_station(tmp_path: Path, **extra: object) -> Iterator[tuple[LisSimulator, str]]:
    lis = LisSimulator(port=free_port()).start()
    settings = Settings(
        storage={"path": tmp_path / "var"},
        database={"url": f"sqlite:///{tmp_path / 'lisplugin.db'}"},
        dicom={"host": "127.0.0.1", "port": free_port()},
        hl7={
            "listen_host": "127.0.0.1",
            "listen_port": free_port(),
            "lis_host": "127.0.0.1",
            "lis_port": lis.port,
            "ack_timeout_seconds": 5,
            "retry_initial_seconds": 0.5,
        },
        cases={"stable_seconds": 0.5},
        **extra,
    )
    detector = GroundTruthDetector()
    runtime = ReviewRuntime(settings, Pipeline.from_settings(settings), detector)
    hashed = hash_password(PASSWORD)
    with runtime.db.session() as session:
        session.add(User(username="tina", password_hash=hashed, role=Role.TECHNOLOGIST))
        session.add(User(username="paul", password_hash=hashed, role=Role.PATHOLOGIST))
    runtime.start()
    try:
        order = build_test_order(
            accession="ACC7001",
            patient_id="PAT7001",
            family="Doe",
            given="Jane",
            birth_date="19800101",
            sex="F",
            priority="S",
        )
        assert send_message("127.0.0.1", settings.hl7.listen_port, order, timeout=10).code == "AA"
        captures = [
            review_capture(tmp_path / "in", detector, 31, "ACC7001", "PAT7001"),
            review_capture(tmp_path / "in", detector, 32, "ACC7002", "PAT7002"),
        ]
        assert all(r.ok for r in send(captures, "127.0.0.1", settings.dicom.port, "LISPLUGIN"))
        assert lis.wait_for(2, timeout=120), "the preliminary results did not reach the LIS"
        with ServerThread(create_app(runtime), free_port()) as server:
            yield lis, server.url
    finally:
        runtime.stop()
        lis.stop()


def sign_in(driver: webdriver.Chrome, url: str, username: str, target: str) -> None:
    driver.get(f"{url}{target}")
    wait = WebDriverWait(driver, 30)
    wait.until(ec.visibility_of_element_located((By.ID, "username"))).send_keys(username)
    driver.find_element(By.ID, "password").send_keys(PASSWORD + Keys.ENTER)
    wait.until(lambda d: "/login" not in d.current_url)
    assert d_path(driver) == target


def d_path(driver: webdriver.Chrome) -> str:
    return "/" + driver.current_url.split("/", 3)[3]


def api_case(url: str, username: str, case_id: int) -> dict:
    with httpx.Client(base_url=url, timeout=30) as client:
        token = client.post("/api/session", json={"username": username, "password": PASSWORD})
        headers = {"Authorization": f"Bearer {token.json()['token']}"}
        return client.get(f"/api/cases/{case_id}", headers=headers).json()


def test_review_station_from_sign_in_to_the_final_result(
    browser: webdriver.Chrome, station: tuple[LisSimulator, str]
) -> None:
    lis, url = station
    ARTIFACTS.mkdir(exist_ok=True)
    wait = WebDriverWait(browser, 60)

    # The technologist signs in (the worklist sends her to the sign-in page and back).
    sign_in(browser, url, "tina", "/worklist")
    rows = browser.find_elements(By.CSS_SELECTOR, "#worklist tbody tr")
    assert len(rows) == 2
    assert "STAT" in rows[0].text and "ACC7001" in rows[0].text  # STAT first
    assert "WBC_FEW" in rows[0].text
    browser.save_screenshot(str(ARTIFACTS / "review-worklist.png"))

    rows[0].find_element(By.CSS_SELECTOR, "a").click()
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, ".tile")))
    case_id = int(browser.current_url.rstrip("/").rsplit("/", 1)[1])
    assert (
        browser.find_element(By.ID, "sign-out-area")
        .find_element(By.TAG_NAME, "button")
        .get_attribute("disabled")
    )  # a technologist cannot sign out
    polygons = browser.find_elements(By.CSS_SELECTOR, "#overlay polygon")
    assert len(polygons) == len(api_case(url, "tina", case_id)["result"]["cells"])
    wait.until(lambda d: d.execute_script("return document.getElementById('field-image').complete"))

    def version() -> int:
        return int(browser.find_element(By.ID, "case-version").text)

    # Reclassify by click: pick a cell, see its saliency, choose a class in the menu.
    first = browser.find_elements(By.CSS_SELECTOR, ".tile")[0]
    first_id = first.get_attribute("data-id")
    first.click()
    wait.until(lambda d: d.find_element(By.ID, "inspector-saliency").get_attribute("src"))
    caption = browser.find_element(By.ID, "saliency-caption").text
    assert "rests on" in caption
    target = "monocyte" if first.get_attribute("data-class") != "monocyte" else "lymphocyte"
    before = version()
    browser.find_element(By.CSS_SELECTOR, f'#class-menu button[data-class="{target}"]').click()
    wait.until(lambda d: version() > before)
    moved = browser.find_element(By.CSS_SELECTOR, f'.tile[data-id="{first_id}"]')
    assert moved.get_attribute("data-class") == target

    # Reclassify by keyboard: next cell, then A (artefact) - it leaves the leukocyte count.
    total = int(browser.find_element(By.ID, "wbc-total").text)
    body = browser.find_element(By.TAG_NAME, "body")
    body.send_keys(Keys.ARROW_RIGHT)
    selected = wait.until(
        lambda d: (
            (t := d.find_element(By.CSS_SELECTOR, ".tile.selected")).get_attribute("data-id")
            != first_id
            and t
        )
    )
    second_id = selected.get_attribute("data-id")
    second_class = selected.get_attribute("data-class")
    if selected.get_attribute("data-class") not in ("erythroblast", "platelet"):
        total -= 1  # it was one of the leukocytes counted
    before = version()
    body.send_keys("a")
    wait.until(lambda d: version() > before)
    assert int(browser.find_element(By.ID, "wbc-total").text) == total
    # ... and 2 (lymphocyte) for one more.
    body.send_keys(Keys.ARROW_RIGHT)
    third = wait.until(
        lambda d: (
            (t := d.find_element(By.CSS_SELECTOR, ".tile.selected"))
            and t.get_attribute("data-id") not in (first_id, second_id)
            and t
        )
    )
    third_id = third.get_attribute("data-id")
    last_id, last_key, last_class = second_id, "a", second_class
    if third.get_attribute("data-class") != "lymphocyte":
        last_id, last_key, last_class = third_id, "2", third.get_attribute("data-class")
        before = version()
        body.send_keys("2")
        wait.until(lambda d: version() > before)

    # U undoes the last change (the cell is selected again), its key redoes it.
    before = version()
    body.send_keys("u")
    wait.until(lambda d: version() > before)
    assert api_case(url, "tina", case_id)["result"]["cells"][int(last_id)]["class"] == last_class
    assert (
        browser.find_element(By.CSS_SELECTOR, ".tile.selected").get_attribute("data-id") == last_id
    )
    before = version()
    body.send_keys(last_key)
    wait.until(lambda d: version() > before)

    case = api_case(url, "tina", case_id)
    cells = {str(c["id"]): c for c in case["result"]["cells"]}
    assert cells[first_id]["class"] == target
    assert cells[second_id]["class"] == "artefact"
    assert cells[third_id]["class"] == "lymphocyte"
    shown = {
        row.get_attribute("data-class"): row.find_elements(By.TAG_NAME, "td")[2].text
        for row in browser.find_elements(By.CSS_SELECTOR, "#differential tr[data-class]")
    }
    for cls, share in case["result"]["differential"].items():
        if cls in ("neutrophil", "lymphocyte", "monocyte", "unidentified"):
            assert shown[cls].startswith(f"{round(share, 1):.1f}"), (cls, shown[cls], share)

    browser.find_element(By.ID, "comment-text").send_keys("two cells corrected; please sign out")
    browser.find_element(By.CSS_SELECTOR, "#comment-form button").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#comment-list li"))
    browser.find_element(By.CSS_SELECTOR, f'.tile[data-id="{first_id}"]').click()
    wait.until(lambda d: d.find_element(By.ID, "inspector-saliency").get_attribute("src"))
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1440, min(max(height + 200, 1950), 2400))  # the whole page
    browser.execute_script("window.scrollTo(0, 0)")
    browser.save_screenshot(str(ARTIFACTS / "review-case.png"))
    browser.set_window_size(1440, 1000)

    # The pathologist signs the case out: not before every flag is acknowledged, and with an
    # override comment, since one field has far fewer than 100 leukocytes.
    browser.find_element(By.ID, "log-out").click()
    wait.until(ec.url_contains("/login"))
    sign_in(browser, url, "paul", f"/cases/{case_id}")
    for size in ((1366, 768), (1920, 1080)):  # the screens a laboratory has
        browser.set_window_size(*size)
        browser.execute_script("window.scrollTo(0, 0)")
        browser.save_screenshot(str(ARTIFACTS / f"review-case-{size[0]}x{size[1]}.png"))
        inner = browser.execute_script("return [window.innerWidth, window.innerHeight]")
        for element in ("sign-out", "count-progress", "flags"):
            box = browser.execute_script(
                f"return document.getElementById('{element}').getBoundingClientRect().toJSON()"
            )
            assert box["right"] <= inner[0] and box["top"] < inner[1], (size, element, box)
        scroll = browser.execute_script("return document.documentElement.scrollWidth")
        assert scroll <= inner[0], (size, "no horizontal scrolling")
    browser.set_window_size(1440, 1000)
    progress = browser.find_element(By.ID, "progress-text").text
    assert f"{total} leukocytes classified" in progress and "more to 100" in progress
    browser.find_element(By.ID, "sign-out").click()
    refused = wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, "#banner.error")))
    assert "Acknowledge every review flag" in refused.text and "WBC_FEW" in refused.text
    while buttons := browser.find_elements(By.CSS_SELECTOR, "#flags button.ack"):
        code = buttons[0].get_attribute("data-ack")
        reason = browser.find_element(By.CSS_SELECTOR, f'.flag[data-code="{code}"] .ack-reason')
        reason.send_keys("checked on the smear")
        seen = version()
        buttons[0].click()
        wait.until(lambda d, seen=seen: version() > seen)
    acknowledged = browser.find_elements(By.CSS_SELECTOR, "#flags .ack-done")
    assert acknowledged and all("paul" in a.text for a in acknowledged)
    body = browser.find_element(By.TAG_NAME, "body")
    body.send_keys("f")  # F opens the sign-out, with the override asked for
    override = wait.until(ec.visibility_of_element_located((By.ID, "override-text")))
    browser.find_element(By.ID, "sign-out-yes").click()
    refused = wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, "#banner.error")))
    assert "override" in refused.text
    browser.find_element(By.ID, "sign-out").click()
    override = wait.until(ec.visibility_of_element_located((By.ID, "override-text")))
    override.send_keys("Leukopenia: one field only, film reviewed by microscopy")
    browser.find_element(By.ID, "sign-out-yes").click()
    banner = wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, "#banner.ok")))
    assert "(F)" in banner.text
    assert browser.find_element(By.ID, "case-status").text.lower() == "final"
    assert lis.wait_for(3, timeout=60)
    final = lis.received[-1]
    assert "ACC7001" in final
    values = obx_values(final)
    assert {status for _, status in values.values()} == {"F"}
    signed = api_case(url, "paul", case_id)
    assert float(values["wbc_classified"][0]) == signed["result"]["wbc_classified"] == total
    for cls, share in signed["result"]["differential"].items():
        key = "erythroblast_per_100wbc" if cls == "erythroblast" else f"{cls}_pct"
        assert float(values[key][0]) == pytest.approx(round(share, 1)), key
    notes = [line for line in final.replace("\n", "\r").split("\r") if line.startswith("NTE")]
    assert any("two cells corrected; please sign out" in n for n in notes)
    assert any("override by paul" in n and "Leukopenia" in n for n in notes)
    assert (ARTIFACTS / "review-worklist.png").stat().st_size
    assert (ARTIFACTS / "review-case.png").stat().st_size

    # N opens the next case on the worklist.
    body = browser.find_element(By.TAG_NAME, "body")
    body.send_keys("n")
    wait.until(lambda d: d_path(d) != f"/cases/{case_id}")
    assert d_path(browser).startswith("/cases/")

    # Errors are pages of the station, whatever address the browser was sent to (the status
    # codes are checked in test_review_api).
    for path, status, words in (
        ("/cases/999999", "404", "no case 999999"),
        ("/api/cases/999999", "404", "no case 999999"),
        (f"/api/cases/{case_id}/signout", "405", "Method Not Allowed"),
        ("/api/cases/not-a-number", "422", "case_id"),
    ):
        browser.get(f"{url}{path}")
        shown = wait.until(ec.visibility_of_element_located((By.ID, "error-status")))
        assert shown.text == status, path
        assert words in browser.find_element(By.TAG_NAME, "main").text, path
        assert browser.title.startswith(status), path
        assert browser.find_element(By.CSS_SELECTOR, ".who-name").text == "paul"
    browser.save_screenshot(str(ARTIFACTS / "review-error.png"))
    browser.find_element(By.LINK_TEXT, "Back to the worklist").click()
    wait.until(lambda d: d_path(d) == "/worklist")


def test_two_stage_review_in_the_browser(
    browser: webdriver.Chrome, two_stage_station: tuple[LisSimulator, str]
) -> None:
    """The technologist acknowledges the flags and completes the technical review; only then
    does the pathologist's sign-out go through."""
    lis, url = two_stage_station
    wait = WebDriverWait(browser, 60)
    sign_in(browser, url, "tina", "/worklist")
    browser.find_elements(By.CSS_SELECTOR, "#worklist tbody tr a")[0].click()
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, ".tile")))
    case_id = int(browser.current_url.rstrip("/").rsplit("/", 1)[1])

    def version() -> int:
        return int(browser.find_element(By.ID, "case-version").text)

    technical = browser.find_element(By.ID, "technical-review")
    technical.click()  # flags still open: refused, and said so
    refused = wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, "#banner.error")))
    assert "acknowledge every review flag" in refused.text
    while buttons := browser.find_elements(By.CSS_SELECTOR, "#flags button.ack"):
        code = buttons[0].get_attribute("data-ack")
        browser.find_element(By.CSS_SELECTOR, f'.flag[data-code="{code}"] .ack-reason').send_keys(
            "seen"
        )
        seen = version()
        buttons[0].click()
        wait.until(lambda d, seen=seen: version() > seen)
    technical.click()
    wait.until(lambda d: "done" in d.find_element(By.ID, "technical-review").text)
    assert "technical review by tina" in browser.find_element(By.ID, "review-stage").text

    browser.find_element(By.ID, "log-out").click()
    wait.until(ec.url_contains("/login"))
    sign_in(browser, url, "paul", f"/cases/{case_id}")
    browser.find_element(By.TAG_NAME, "body").send_keys("f")
    wait.until(ec.visibility_of_element_located((By.ID, "override-text"))).send_keys(
        "one field, film checked"
    )
    browser.find_element(By.ID, "sign-out-yes").click()
    banner = wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, "#banner.ok")))
    assert "(F)" in banner.text
    assert lis.wait_for(3, timeout=60)
