"""The web page in headless Chromium against a live server: enter the API key and a note, press
Predict (and Ctrl+Enter), and see a protocol from the label set, its confidence and alternatives.

Needs Debian's ``chromium`` and ``chromium-driver`` and selenium (dev extra). Without them the
test is SKIPPED with the reason shown by ``-ra``; MEDTUNE_REQUIRE_BROWSER=1 makes it a failure.
"""

from __future__ import annotations

import os
import shutil

import pytest

from conftest import TINY_LABELS, TINY_NOTES

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
KEY = "browser-key"


def _require_browser():
    missing = [name for name, path in (("chromium", CHROMIUM), ("chromedriver", DRIVER))
               if path is None]
    for module in ("selenium", "fastapi", "uvicorn"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        reason = f"headless browser test needs {', '.join(missing)}"
        if os.environ.get("MEDTUNE_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


def _chromium():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-extensions", "--no-first-run", "--no-proxy-server"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)


def test_page_predicts_in_headless_chromium(merged_dir):
    _require_browser()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from medtune.serve import create_app, serving_in_thread

    app = create_app(str(merged_dir), api_key=KEY)
    with serving_in_thread(app) as url:
        driver = _chromium()
        try:
            driver.set_page_load_timeout(30)
            wait = WebDriverWait(driver, 20)
            driver.get(url + "/")
            wait.until(lambda d: d.find_element(By.ID, "status").text.startswith("Model ready"))
            note = driver.find_element(By.ID, "note")
            note.send_keys(TINY_NOTES[0])
            driver.find_element(By.ID, "predict").click()
            # no key yet: the page asks for one
            key = wait.until(ec.visibility_of_element_located((By.ID, "key")))
            assert "API key" in driver.find_element(By.ID, "error").text
            assert driver.switch_to.active_element == key
            key.send_keys(KEY)
            driver.find_element(By.ID, "predict").click()
            label = wait.until(ec.visibility_of_element_located((By.ID, "label")))
            wait.until(lambda d: d.find_element(By.ID, "label").text != "")
            first = label.text
            assert first in TINY_LABELS
            assert driver.find_element(By.ID, "conf-pct").text.endswith("%")
            width = driver.execute_script(
                "return document.getElementById('conf-fill').style.width;")
            assert width.endswith("%") and float(width[:-1]) > 0
            alts = [li.text for li in driver.find_elements(By.CSS_SELECTOR, "#alts li")]
            assert len(alts) == 2  # top_k 3: the prediction plus two alternatives
            assert all(any(a.startswith(lab) for lab in TINY_LABELS) for a in alts)

            # Ctrl+Enter submits too; a markup-looking note is never rendered as HTML
            driver.execute_script("document.getElementById('label').textContent = '';")
            note.clear()
            note.send_keys("<img src=x onerror=alert(1)> " + TINY_NOTES[2])
            note.send_keys(Keys.CONTROL, Keys.ENTER)
            wait.until(lambda d: d.find_element(By.ID, "label").text != "")
            assert driver.find_element(By.ID, "label").text in TINY_LABELS
            assert driver.execute_script("return document.images.length;") == 0
            severe = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"
                      and "401" not in e.get("message", "")]
            assert severe == []
        finally:
            driver.quit()


def test_page_says_when_the_model_failed_to_load():
    _require_browser()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from medtune.errors import MedtuneError
    from medtune.serve import create_app, serving_in_thread

    def broken():
        raise MedtuneError("/secret/path: model directory not found")

    with serving_in_thread(create_app(broken), wait_ready=False) as url:
        driver = _chromium()
        try:
            driver.set_page_load_timeout(30)
            driver.get(url + "/")
            status = WebDriverWait(driver, 20).until(  # not "Model loading..." forever
                lambda d: d.find_element(By.ID, "status").text.startswith("Model failed")
                and d.find_element(By.ID, "status").text)
            assert "server log" in status and "secret" not in status
        finally:
            driver.quit()


def test_page_asks_a_multiple_choice_model_for_four_options():
    _require_browser()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from medtune.serve import create_app, serving_in_thread

    class Letters:
        task = "mcqa"

        def __init__(self):
            self.labels, self.seen = ["A", "B", "C", "D"], []

        def predict_texts(self, texts):
            self.seen.extend(texts)
            return [{"prediction": "C", "confidence": 0.7, "abstained": False,
                     "top_k": [["C", 0.7], ["A", 0.2], ["B", 0.1]]} for _ in texts]

    fake = Letters()
    with serving_in_thread(create_app(lambda: fake)) as url:
        driver = _chromium()
        try:
            wait = WebDriverWait(driver, 20)
            driver.get(url + "/")
            wait.until(lambda d: d.find_element(By.ID, "status").text.startswith("Model ready"))
            assert driver.find_element(By.ID, "note-label").text == "Question"
            assert driver.find_element(By.ID, "options").is_displayed()
            driver.find_element(By.ID, "note").send_keys("Which nerve?")
            for i, option in enumerate(["Ulnar", "Radial", "Median"]):
                driver.find_element(By.ID, f"opt-{i}").send_keys(option)
            driver.find_element(By.ID, "predict").click()  # option D is still empty
            assert "all four options" in driver.find_element(By.ID, "error").text
            assert driver.switch_to.active_element == driver.find_element(By.ID, "opt-3")
            assert fake.seen == []
            driver.find_element(By.ID, "opt-3").send_keys("Axillary")
            driver.find_element(By.ID, "predict").click()
            label = wait.until(ec.visibility_of_element_located((By.ID, "label")))
            wait.until(lambda d: d.find_element(By.ID, "label").text != "")
            assert label.text == "C. Median"
            assert driver.find_element(By.ID, "result-title").text.lower() == "suggested answer"
            alts = [li.text for li in driver.find_elements(By.CSS_SELECTOR, "#alts li")]
            assert alts[0].startswith("A. Ulnar") and alts[1].startswith("B. Radial")
            assert fake.seen == ["Which nerve?\nA. Ulnar\nB. Radial\nC. Median\nD. Axillary"]
        finally:
            driver.quit()
