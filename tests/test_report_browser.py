"""Open report.html in headless Chromium: every image decodes and the console has no errors.

Needs Debian's ``chromium`` and ``chromium-driver`` (apt-get install -y chromium chromium-driver)
and selenium (dev extra). Without them the test is SKIPPED with the reason shown by ``-ra``;
set MEDTUNE_REQUIRE_BROWSER=1 to make their absence a failure instead.
"""

from __future__ import annotations

import os
import shutil

import pytest

from medtune import report
from medtune.metrics import classification_metrics

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


def _require_browser():
    missing = [name for name, path in (("chromium", CHROMIUM), ("chromedriver", DRIVER))
               if path is None]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium")
    if missing:
        reason = f"headless browser test needs {', '.join(missing)}"
        if os.environ.get("MEDTUNE_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


def _build_report(tmp_path):
    labels = ["CT Head", "MRI Brain", "<script>alert(1)</script>"]
    gold = [labels[i % 3] for i in range(30)]
    pred = [labels[(i * 7) % 3] if i % 4 == 0 else gold[i] for i in range(30)]
    conf = [0.35 + 0.02 * i for i in range(30)]
    m = classification_metrics(gold, pred, conf, labels)
    loss = tmp_path / "metrics.jsonl"
    loss.write_text("".join(f'{{"step": {s}, "loss": {1.0 / s}}}\n' for s in range(1, 6)),
                    encoding="utf-8")
    rows = [{"model": "tf-idf", "accuracy": 0.7, "size_mb": 2.0},
            {"model": "fine-tuned", "accuracy": m["accuracy"], "size_mb": 50.0}]
    images = {"confusion": report.confusion_png(m["confusion"], m["labels"]),
              "reliability": report.reliability_png(m["reliability"]),
              "coverage": report.coverage_png(m["coverage_curve"]),
              "loss": report.loss_curve_png(loss),
              "accuracy": report.comparison_png(rows, "accuracy")}
    written = report.write_report(tmp_path / "out", title="Browser check", metrics=m,
                                  comparison=rows, images=images, notes=["<b>not bold</b>"])
    return written["report.html"], len(images)


def test_report_renders_in_headless_chromium(tmp_path):
    _require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    page, n_images = _build_report(tmp_path)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    try:
        driver.set_page_load_timeout(30)
        driver.get(page.resolve().as_uri())
        states = driver.execute_script(
            "return Array.from(document.images).map(i => [i.complete, i.naturalWidth]);")
        assert len(states) == n_images
        assert all(complete and width > 0 for complete, width in states), states
        assert driver.title == "Browser check"
        # escaped markup shows as text; no element was injected from the data
        assert driver.execute_script("return document.scripts.length;") == 0
        assert driver.execute_script("return document.querySelectorAll('b').length;") == 0
        severe = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        assert severe == []
    finally:
        driver.quit()
