"""The web page in a real headless Chromium: type a prompt, watch it run, see the image."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import ALICE_KEY, Gateway, WorkerProcess

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture
def browser() -> Iterator[object]:
    """Debian's chromium, headless, driven through chromedriver."""
    if not (Path(CHROMIUM).exists() and Path(DRIVER).exists()):
        pytest.skip("chromium and chromium-driver are not installed (./dq test installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--window-size=900,700",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def test_the_page_submits_a_prompt_and_shows_the_image(
    env: dict[str, str],
    gateway: Gateway,
    worker_factory: Callable[..., WorkerProcess],
    browser: object,
    tmp_path: Path,
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.support.ui import WebDriverWait

    assert isinstance(browser, WebDriver)
    worker_factory(env)
    browser.get(f"{gateway.url}/")
    assert browser.title == "diffusion-queue"
    browser.find_element(By.ID, "prompt").send_keys("a lighthouse at dusk")
    browser.find_element(By.ID, "key").send_keys(ALICE_KEY)
    steps = browser.find_element(By.ID, "steps")
    steps.clear()
    steps.send_keys("3")
    browser.find_element(By.ID, "go").click()

    def shown(driver: WebDriver) -> bool:
        images = driver.find_elements(By.CSS_SELECTOR, ".job img")
        return (
            bool(images)
            and driver.execute_script("return arguments[0].naturalWidth", images[0]) == 64
        )

    WebDriverWait(browser, 60).until(shown)
    card = browser.find_element(By.CSS_SELECTOR, ".job")
    assert card.find_element(By.CLASS_NAME, "state").text == "succeeded"
    assert "a lighthouse at dusk" in card.text
    assert browser.find_element(By.ID, "status").text.startswith("submitted job_")
    browser.save_screenshot(str(tmp_path / "page.png"))


def test_the_page_shows_a_refusal_in_words(gateway: Gateway, browser: object) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.support.ui import WebDriverWait

    assert isinstance(browser, WebDriver)
    browser.get(f"{gateway.url}/")
    browser.find_element(By.ID, "prompt").send_keys("no key given")
    browser.find_element(By.ID, "go").click()
    status = browser.find_element(By.ID, "status")
    WebDriverWait(browser, 20).until(lambda _: status.text != "")
    assert status.text == "send a valid key as 'Authorization: Bearer <key>'"
