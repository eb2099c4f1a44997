"""ffvt-demo and the evaluation report in a real browser: Debian's headless Chromium driven by Selenium through
Debian's chromedriver (.ci/run installs both), on 127.0.0.1 only.

With FFVT_SCREENSHOTS=FOLDER the test also saves the screenshots docs/usage.md shows (demo.png, report.png).
"""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState
from PIL import Image

from conftest import digits_of, python_environment, save_tiny_model, write_digits
from modeling_ffvt.evaluate_cli import main as evaluate
from modeling_ffvt.image_processor import make_image_processor
from modeling_ffvt.predict import main as predict
from modeling_ffvt.selection_map import selection_map

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = [
    pytest.mark.slow,  # about a minute: Gradio's import and Chromium's start
    pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver"),
]
CLASSES = [str(digit) for digit in range(10)]
WAIT_S = 120


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1200,900",
                     # Every name but the loopback address fails: the page may load nothing from elsewhere.
                     "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):
        options.add_argument(argument)
    # A driver path given to the Service means Selenium Manager (which downloads drivers) is never run.
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def serving(log_path, *args, port):
    """`python ARGS` running in the background until http://127.0.0.1:PORT/ answers; stopped on exit by Ctrl-C
    (SIGINT), as a user stops it."""
    with open(log_path, "w") as log:
        server = subprocess.Popen([sys.executable, *map(str, args)], env=python_environment(), stdout=log,
                                  stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"the server did not start:\n{Path(log_path).read_text()[-3000:]}") from None
                time.sleep(0.5)
        yield server
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def screenshot(driver, name):
    folder = os.environ.get("FFVT_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(folder, name)))


def test_demo_in_a_browser(browser, tmp_path, capsys):
    model_folder = tmp_path / "model"
    # Random tiny models give most digits one top class; with this seed the uploaded 0 gets another than the examples.
    model = save_tiny_model(model_folder, CLASSES, seed=8)
    image, = write_digits(tmp_path / "upload", digits_of(0, 1), size=64)
    examples = write_digits(tmp_path / "examples", [digits_of(digit, 1)[0] for digit in (1, 3)], size=64)
    predict(["--model", str(model_folder), str(image), str(examples[-1]), "--json"])
    predictions, example_predictions = (result["predictions"] for result in json.loads(capsys.readouterr().out))
    assert predictions[0]["label"] != example_predictions[0]["label"]
    expected_map, _ = selection_map(model, make_image_processor(32, 36), image)

    port = free_port()
    command = ["-m", "modeling_ffvt.demo", "--model", model_folder, "--port", port, "--examples", tmp_path / "examples"]
    with serving(tmp_path / "server.log", *command, port=port) as server:
        browser.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(browser, WAIT_S)
        upload = wait.until(lambda driver: driver.find_element(By.CSS_SELECTOR, "#ffvt-input input[type=file]"))
        assert len(browser.find_elements(By.CSS_SELECTOR, ".gallery-item img")) == len(examples)
        upload.send_keys(str(image))
        wait.until(lambda driver: driver.find_elements(By.CSS_SELECTOR, "#ffvt-input img"))
        browser.find_element(By.ID, "ffvt-classify").click()
        shown = wait.until(lambda driver: label_rows(driver) or None)
        # The five best classes, best first, as ffvt-predict ranks them (the page shows percentages).
        assert [name for name, _ in shown] == [prediction["label"] for prediction in predictions]
        for (_, percent), prediction in zip(shown, predictions):
            assert percent == pytest.approx(100 * prediction["probability"], abs=1)
        heading = browser.find_element(By.CSS_SELECTOR, "#ffvt-labels [data-testid=label-output-value]").text
        assert heading.strip() == predictions[0]["label"]
        picture = wait.until(lambda driver: loaded_images(driver, "#ffvt-selection-map img") or None)
        assert picture == [list(expected_map.size)]  # the selection map of this image, as drawn by the package
        screenshot(browser, "demo.png")

        # An example picked on the page instead of an upload.
        example, = [item for item in browser.find_elements(By.CSS_SELECTOR, ".gallery-item img")
                    if item.get_attribute("src").endswith("/" + examples[-1].name)]
        uploaded = input_sources(browser)
        example.click()
        # The example replaces the upload in the input before Classify reads it (on a busy machine, later than the
        # click returns): clicking earlier would classify the upload again.
        wait.until(lambda driver: input_sources(driver) not in ([], uploaded))
        browser.find_element(By.ID, "ffvt-classify").click()
        expected = [prediction["label"] for prediction in example_predictions]
        wait.until(lambda driver: [name for name, _ in label_rows(driver)] == expected)
    # Ctrl-C stops the server with one line and a shell's status for it, without Gradio's message or a traceback.
    log = (tmp_path / "server.log").read_text()
    assert server.returncode == 130 and log.splitlines()[-1] == "Stopped the demo server.", log[-3000:]
    assert "Traceback" not in log and "Keyboard interruption" not in log


def input_sources(driver) -> list[str]:
    """The src of each picture the input component shows."""
    return [image.get_attribute("src") for image in driver.find_elements(By.CSS_SELECTOR, "#ffvt-input img")]


def label_rows(driver):
    """(name, percent) of each class row the gr.Label shows."""
    rows = []
    for row in driver.find_elements(By.CSS_SELECTOR, "#ffvt-labels .confidence-set"):
        name = row.find_element(By.CSS_SELECTOR, ".text").text.strip()
        percent = row.find_element(By.CSS_SELECTOR, ".confidence").text.strip().rstrip("%")
        rows.append((name, float(percent)))
    return rows


def loaded_images(driver, selector):
    """[naturalWidth, naturalHeight] of each image matching `selector`, or [] while one is still loading."""
    sizes = driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map(i => i.complete ? [i.naturalWidth, i.naturalHeight]"
        " : null)",
        selector,
    )
    return [] if None in sizes else sizes


def test_report_in_a_browser(browser, tmp_path):
    model_folder = tmp_path / "model"
    save_tiny_model(model_folder, CLASSES[:4], seed=9)
    for digit in range(4):
        write_digits(tmp_path / "digits" / str(digit), digits_of(digit, 4))
    try:
        evaluate(["--model", str(model_folder), "--data_dir", str(tmp_path / "digits"), "--report",
                  str(tmp_path / "report")])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    pictures = sorted((tmp_path / "report").glob("*.png"))
    browser.get((tmp_path / "report" / "report.html").as_uri())
    sizes = WebDriverWait(browser, WAIT_S).until(lambda driver: loaded_images(driver, "img") or None)
    assert len(sizes) == len(pictures) >= 3
    expected = []
    for path in pictures:
        with Image.open(path) as picture:
            expected.append(list(picture.size))
    assert sorted(sizes) == sorted(expected)  # every picture decoded, at its own size
    assert browser.find_element(By.ID, "summary").text.count("\n") >= 8
    screenshot(browser, "report.png")
