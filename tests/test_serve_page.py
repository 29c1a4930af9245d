"""The page of `kiln serve` in real headless Chromium (Debian's chromium + chromium-driver).

A person's path: type a prompt, click generate, watch the progress move, get an image that
decodes; upload an image and get its caption. Screenshots go to $KILN_SCREENSHOTS (or the
test's temporary folder).
"""

import base64
import io
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from serve_helpers import Server

import kiln
from kiln.models.tiny_captioning import save_model

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if not (CHROMIUM and DRIVER):
    pytest.skip(
        "needs Debian's chromium and chromium-driver (installed by scripts/install-browser.sh)",
        allow_module_level=True,
    )
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (the dev extra)")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

KEY = "page-key"


@pytest.fixture(scope="module")
def server(artifacts, tmp_path_factory):
    blip = tmp_path_factory.mktemp("page") / "blip-captions"
    kiln.export(save_model("blip", blip.parent / "blip-model", seed=0), blip)
    running = Server([artifacts["sd1"], blip], "--max-steps", "200", key=KEY)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,900",
    ):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=DRIVER)
    driver = webdriver.Chrome(options=options, service=service)
    yield driver
    driver.quit()


def _shots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("KILN_SCREENSHOTS", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_generate_and_caption_in_the_page(server, browser, tmp_path):
    wait = WebDriverWait(browser, 120, poll_frequency=0.05)
    browser.get(f"{server.url}/#key={KEY}")
    wait.until(lambda d: d.find_element(By.ID, "status").text == "ready")
    prompt = browser.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys("a red cube on a blue floor")
    for field, value in (("steps", "120"), ("width", "128"), ("height", "128"), ("seed", "7")):
        element = browser.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)
    browser.find_element(By.ID, "generate").click()
    seen = set()
    deadline = time.monotonic() + 120
    while not browser.find_elements(By.CSS_SELECTOR, "#result img"):
        assert time.monotonic() < deadline, "no image"
        seen.add(float(browser.find_element(By.ID, "bar").get_attribute("value") or 0))
        error = browser.find_element(By.ID, "gen-error").text
        assert not error, error
    assert any(0 < value < 1 for value in seen), seen  # the bar moved while it ran
    source = browser.find_element(By.CSS_SELECTOR, "#result img").get_attribute("src")
    image = Image.open(io.BytesIO(base64.b64decode(source.partition(",")[2])))
    assert image.size == (128, 128)
    assert "seed 7" in browser.find_element(By.CSS_SELECTOR, "#result figcaption").text
    folder = _shots(tmp_path)
    browser.save_screenshot(str(folder / "serve-generate.png"))

    photo = tmp_path / "photo.png"
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(photo)
    browser.find_element(By.CSS_SELECTOR, "nav button[data-tab=caption]").click()
    upload = browser.find_element(By.ID, "file")
    browser.execute_script("arguments[0].hidden = false", upload)
    upload.send_keys(str(photo))
    wait.until(lambda d: d.find_element(By.ID, "caption").is_enabled())
    browser.find_element(By.ID, "caption").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#captions li"))
    assert not browser.find_element(By.ID, "cap-error").text
    browser.save_screenshot(str(folder / "serve-caption.png"))

    browser.find_element(By.CSS_SELECTOR, "nav button[data-tab=plan]").click()
    wait.until(lambda d: "unet/onnx/fp32" in d.find_element(By.ID, "plan").text)
    browser.save_screenshot(str(folder / "serve-plan.png"))
