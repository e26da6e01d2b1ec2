"""The demo page in a real browser: headless Debian Chromium (chromium-driver, via Selenium)
against ``advguard serve`` on a loopback port, with the CIFAR-10 archive as neighbour source.

An untrusted visitor sees verdicts only; once the admin token is typed in, the page draws the
evidence of a rejection: the score bar against the threshold, the vote histogram and the nearest
training images. ``ADVGUARD_SCREENSHOT=docs/demo-page.png`` saves the page after the trusted
rejection (the README's picture); without it the screenshot goes to the test's tmp directory.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service as ChromeService
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from app.core.manifest import MANIFEST_NAME, Manifest
from app.service.settings import DEFAULT_BUNDLE
from tests.deploy.helpers import advguard_serve
from tests.service.helpers import CIFAR_TAR, free_port

EXAMPLES = Path(__file__).resolve().parents[2] / "app" / "service" / "static" / "examples"
TOKEN = "demo-page-admin-token"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
WAIT_S = 120  # generous: CI machines are shared; the first thumbnail scans the archive


def _example(kind: str) -> dict[str, Any]:
    """The first bundled example of ``kind`` (authentic, fgsm, pgd)."""
    examples = json.loads((EXAMPLES / "examples.json").read_text())["examples"]
    found: dict[str, Any] = next(e for e in examples if e["kind"] == kind)
    return found


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    env = {
        "ADVGUARD_ADMIN_TOKEN": TOKEN,
        "ADVGUARD_NEIGHBOUR_SOURCE": str(CIFAR_TAR),
        "ADVGUARD_MAX_WAIT_MS": "1",
    }
    log = tmp_path_factory.mktemp("demo") / "serve.log"
    with advguard_serve(port, log, env, "--log-level", "warning"):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    for tool in (CHROMIUM, CHROMEDRIVER):
        if not Path(tool).is_file():
            pytest.fail(f"{tool} is missing: apt-get install chromium chromium-driver (.ci/run)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1360,1000",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=ChromeService(CHROMEDRIVER))
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def _open(browser: WebDriver, base: str) -> None:
    browser.get(base + "/")
    WebDriverWait(browser, WAIT_S).until(
        lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true"
    )


def _upload(browser: WebDriver, path: Path) -> str:
    """Send ``path`` through the page's file input; the decision shown."""
    browser.execute_script("document.getElementById('result').textContent = ''")
    browser.find_element(By.ID, "file").send_keys(str(path))
    WebDriverWait(browser, WAIT_S).until(lambda d: d.find_elements(By.ID, "decision"))
    return browser.find_element(By.ID, "decision").text.strip().lower()


def _evidence_shown(browser: WebDriver) -> bool:
    return browser.find_element(By.ID, "evidence").is_displayed()


def test_untrusted_visitor_sees_verdicts_without_evidence(service: str, browser: WebDriver) -> None:
    _open(browser, service)
    assert "public" in browser.find_element(By.ID, "session").text
    authentic = _example("authentic")
    assert _upload(browser, EXAMPLES / authentic["file"]) == "accepted"
    assert browser.find_element(By.ID, "class").text.strip() == authentic["true_class"]
    assert "probability" in browser.find_element(By.ID, "probability").text
    assert not _evidence_shown(browser)
    adversarial = _example("pgd")
    assert _upload(browser, EXAMPLES / adversarial["file"]) == "rejected"
    assert not browser.find_elements(By.ID, "class")  # the label is withheld
    assert not _evidence_shown(browser)
    assert not browser.find_elements(By.CSS_SELECTOR, "#neighbours img")
    assert "trusted callers only" in browser.find_element(By.ID, "flag-state").text
    # and the service sent none: the evidence is omitted, not merely hidden by the page
    with httpx.Client(base_url=service, timeout=30) as client:
        data = (EXAMPLES / adversarial["file"]).read_bytes()
        body = client.post("/classify?explain=true", files={"file": ("x.png", data)}).json()
    assert body["decision"] == "rejected" and body["explanation"] is None


def test_the_same_file_chosen_twice_is_classified_twice(service: str, browser: WebDriver) -> None:
    """The input kept its value, so choosing the same file again fired no change (a review)."""
    _open(browser, service)
    authentic = EXAMPLES / _example("authentic")["file"]
    assert _upload(browser, authentic) == "accepted"
    assert _upload(browser, authentic) == "accepted"  # _upload cleared the result in between


def test_the_file_chooser_is_reached_from_the_keyboard(service: str, browser: WebDriver) -> None:
    """The file input is hidden, and its label was not focusable: no way to choose a file
    without a mouse. The drop zone now takes focus (Tab) and Enter or Space opens the chooser."""
    _open(browser, service)
    browser.execute_script(
        "window.__opened = 0; document.getElementById('file').click = () => window.__opened++"
    )
    drop = browser.find_element(By.ID, "drop")
    assert drop.get_attribute("tabindex") == "0"
    browser.execute_script("document.activeElement.blur()")
    body = browser.find_element(By.TAG_NAME, "body")
    for _ in range(20):  # Tab until the drop zone has the focus
        if browser.execute_script("return document.activeElement.id") == "drop":
            break
        body.send_keys(Keys.TAB)
    assert browser.execute_script("return document.activeElement.id") == "drop"
    drop.send_keys(Keys.ENTER)
    drop.send_keys(Keys.SPACE)
    assert browser.execute_script("return window.__opened") == 2


def test_a_wrong_token_and_a_non_image_say_so(
    service: str, browser: WebDriver, tmp_path: Path
) -> None:
    """A wrong admin token read as plain "public"; a rejected upload left a broken preview."""
    _open(browser, service)
    browser.find_element(By.CSS_SELECTOR, "#credentials summary").click()
    browser.find_element(By.ID, "admin-token").send_keys("not-the-token")
    browser.find_element(By.ID, "save-credentials").click()
    WebDriverWait(browser, WAIT_S).until(
        lambda d: "not accepted" in d.find_element(By.ID, "session").text
    )
    browser.execute_script("sessionStorage.clear()")
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    browser.execute_script("document.getElementById('result').textContent = ''")
    browser.find_element(By.ID, "file").send_keys(str(text))
    WebDriverWait(browser, WAIT_S).until(
        lambda d: "invalid_image" in d.find_element(By.ID, "result").text
    )
    WebDriverWait(browser, WAIT_S).until(
        lambda d: not d.find_element(By.ID, "preview").is_displayed()
    )


def test_an_image_dropped_on_the_page_is_classified(service: str, browser: WebDriver) -> None:
    """Drag and drop: a real ``drop`` event carrying the file, as a browser fires it."""
    _open(browser, service)
    authentic = _example("authentic")
    browser.execute_script("document.getElementById('result').textContent = ''")
    browser.execute_async_script(
        """
        const [file, done] = arguments;
        fetch('/static/examples/' + file).then(r => r.blob()).then(blob => {
          const transfer = new DataTransfer();
          transfer.items.add(new File([blob], file, {type: 'image/png'}));
          document.getElementById('drop').dispatchEvent(
            new DragEvent('drop', {dataTransfer: transfer, bubbles: true, cancelable: true}));
          done();
        });
        """,
        authentic["file"],
    )
    WebDriverWait(browser, WAIT_S).until(lambda d: d.find_elements(By.ID, "decision"))
    assert browser.find_element(By.ID, "decision").text.strip().lower() == "accepted"
    assert browser.find_element(By.ID, "class").text.strip() == authentic["true_class"]


def test_trusted_caller_sees_the_evidence_of_a_rejection(
    service: str, browser: WebDriver, tmp_path: Path
) -> None:
    _open(browser, service)
    browser.find_element(By.CSS_SELECTOR, "#credentials summary").click()
    browser.find_element(By.ID, "admin-token").send_keys(TOKEN)
    browser.find_element(By.ID, "save-credentials").click()
    WebDriverWait(browser, WAIT_S).until(
        lambda d: "trusted" in d.find_element(By.ID, "session").text
    )
    authentic = _example("authentic")
    assert _upload(browser, EXAMPLES / authentic["file"]) == "accepted"
    assert browser.find_element(By.ID, "class").text.strip() == authentic["true_class"]
    assert _evidence_shown(browser)
    # an example button sends the FGSM adversarial
    adversarial = _example("fgsm")
    browser.execute_script("document.getElementById('result').textContent = ''")
    browser.find_element(By.CSS_SELECTOR, f"button[data-file='{adversarial['file']}']").click()
    WebDriverWait(browser, WAIT_S).until(lambda d: d.find_elements(By.ID, "decision"))
    assert browser.find_element(By.ID, "decision").text.strip().lower() == "rejected"
    assert _evidence_shown(browser)
    # the bar: the score sits left of the threshold mark
    fill = browser.find_element(By.ID, "score-fill").size["width"]
    mark = browser.find_element(By.ID, "threshold-mark").location["x"]
    left = browser.find_element(By.ID, "scorebar").location["x"]
    assert fill < mark - left, (fill, mark, left)
    assert "< threshold" in browser.find_element(By.ID, "score-text").text
    rows = browser.find_elements(By.CSS_SELECTOR, "#histogram .row")
    assert len(rows) == 10
    (predicted,) = browser.find_elements(By.CSS_SELECTOR, "#histogram .row.predicted")
    assert predicted.text.split()[0] in browser.find_element(By.ID, "result").text
    counts = [int(row.text.split()[-1]) for row in rows]
    assert sum(counts) == 1000  # the vote's k neighbours
    # one row per statistic of the demo bundle's detector (round 13's v2: the vote, the three
    # stages' distances, the margin, the two pixel energies and the suspect JPEG margin)
    manifest = Manifest.model_validate_json((DEFAULT_BUNDLE / MANIFEST_NAME).read_text())
    statistics = len(manifest.detector.statistic_specs())
    assert len(browser.find_elements(By.CSS_SELECTOR, "#statistics tbody tr")) == statistics == 8
    WebDriverWait(browser, WAIT_S).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, "#neighbours img.thumb")) == 8
    )
    loaded = browser.execute_script(
        "return Array.from(document.querySelectorAll('#neighbours img.thumb'))"
        ".every(img => img.complete && img.naturalWidth === 32)"
    )
    assert loaded, "neighbour thumbnails did not load"
    flag = browser.find_element(By.ID, "flag-state").text
    assert "not flagged" in flag and "requests" in flag
    browser.execute_script("window.scrollTo(0, 0)")
    target = Path(os.environ.get("ADVGUARD_SCREENSHOT") or tmp_path / "demo-page.png")
    target.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(target))
    assert target.stat().st_size > 10_000
