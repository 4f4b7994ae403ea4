"""The web page in a real headless Chromium: key, submit, progress, image, job view, cancel,
a refusal in words, gallery, operator view.

`DQ_PAGE_SHOTS=docs/page pytest tests/test_page.py` writes the screenshots the README shows.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import (
    ALICE_KEY,
    TEST_KEYS,
    Gateway,
    WorkerProcess,
    client_for,
    settings_from,
    wait_for,
)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ADMIN_KEY = "key-ops-0123456789abcdefghij"


def chrome(width: int, height: int) -> Any:
    """Debian's chromium, headless, driven through chromedriver, its console log kept."""
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
        "--hide-scrollbars",
        "--force-color-profile=srgb",
        f"--window-size={width},{height}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(DRIVER), options=options)


@pytest.fixture
def browser() -> Iterator[object]:
    """A small browser window."""
    driver = chrome(900, 700)
    yield driver
    driver.quit()


@pytest.fixture
def wide() -> Iterator[Any]:
    """A desktop-sized browser window (the screenshots' size)."""
    driver = chrome(1280, 860)
    yield driver
    driver.quit()


class Page:
    """The page in a browser, with the few moves a test makes."""

    def __init__(self, driver: Any, url: str, shots: Path) -> None:
        self.driver, self.url, self.shots = driver, url, shots

    def open(self, path: str = "/") -> None:
        self.driver.get(self.url + path)

    def go(self, view: str) -> None:
        self.driver.execute_script("location.hash = arguments[0]", view)

    def el(self, css: str) -> Any:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, css)

    def all(self, css: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        return list(self.driver.find_elements(By.CSS_SELECTOR, css))

    def text(self, css: str) -> str:
        """The text of the first element `css` finds, read in one step ("" if none)."""
        script = "const el = document.querySelector(arguments[0]); return el ? el.innerText : ''"
        return str(self.driver.execute_script(script, css)).strip()

    def click(self, css: str) -> None:
        """Click an element of a card that is drawn again at every event (so may go stale)."""
        from selenium.common.exceptions import StaleElementReferenceException

        def clicked() -> bool:
            try:
                self.el(css).click()
            except StaleElementReferenceException:
                return False
            return True

        self.until(clicked, 10, f"a click on {css}")

    def set(self, element_id: str, value: object) -> None:
        """Set an input the way a user's edit would (ranges take no typing)."""
        self.driver.execute_script(
            "const el = document.getElementById(arguments[0]); el.value = arguments[1];"
            "el.dispatchEvent(new Event('input', {bubbles: true}));"
            "el.dispatchEvent(new Event('change', {bubbles: true}));",
            element_id,
            str(value),
        )

    def set_in(self, css: str, value: object) -> None:
        """Set the first input `css` finds, as a user's edit would."""
        self.driver.execute_script(
            "const el = document.querySelector(arguments[0]); el.value = arguments[1];"
            "el.dispatchEvent(new Event('input', {bubbles: true}));",
            css,
            str(value),
        )

    def type(self, css: str, text: str) -> None:
        element = self.el(css)
        element.clear()
        element.send_keys(text)

    def until(self, check: Callable[[], Any], timeout: float = 60, what: str = "") -> Any:
        from selenium.webdriver.support.ui import WebDriverWait

        return WebDriverWait(self.driver, timeout, 0.05).until(lambda _: check(), what)

    def submit(self) -> str:
        """Click Generate; the id of the job it made."""
        before = self.text("#status")
        self.el("#go").click()
        self.until(lambda: self.text("#status") not in (before, "submitting…"), 20, "an answer")
        status = self.text("#status")
        assert status.startswith("submitted job_"), status
        return status.removeprefix("submitted ")

    def card(self, job_id: str) -> str:
        """The text of a job's card in the live column."""
        return self.text(f'#jobs [data-job="{job_id}"]')

    def state(self, job_id: str) -> str:
        return self.text(f'#jobs [data-job="{job_id}"] .state')

    def shot(self, name: str) -> None:
        self.driver.save_screenshot(str(self.shots / f"{name}.png"))

    def problems(self) -> list[str]:
        """Script errors and refusals by the page's Content-Security-Policy, from the console
        (an answer of 4xx is logged there too: those are the API's to give)."""
        logged = [e["message"] for e in self.driver.get_log("browser") if e["level"] == "SEVERE"]
        return [m for m in logged if "Failed to load resource" not in m]


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    """Where screenshots go: DQ_PAGE_SHOTS (the README's docs/page), else the test's folder."""
    folder = Path(os.environ.get("DQ_PAGE_SHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def depth(page: Page) -> tuple[int, int]:
    """Queued and running, as the operator view's tiles show them."""
    found = re.search(r"Queued\n(\d+)\n.*Running\n(\d+)", page.text("#tiles"), re.S)
    return (int(found[1]), int(found[2])) if found else (0, 0)


def enter_key(page: Page, key: str) -> None:
    page.until(lambda: page.el("#key-dialog").is_displayed(), 20, "the key dialog")
    page.type("#key", key)
    page.el("#key-go").click()


@pytest.mark.browser
def test_the_page_from_key_to_image_job_view_cancel_refusal_gallery_and_operator(
    env: dict[str, str],
    gateway: Gateway,
    worker_factory: Callable[..., WorkerProcess],
    wide: Any,
    shots: Path,
    tmp_path: Path,
) -> None:
    worker_factory(env, DQ_CANCEL_GRACE_S="1")  # the canceled long call below ends it soon
    page = Page(wide, gateway.url, shots)
    page.open()
    page.shot("key")
    enter_key(page, ALICE_KEY)
    page.until(lambda: page.el("#view-create").is_displayed(), 20, "the create view")
    assert wide.title == "diffusion-queue"
    assert page.text("#who").startswith("key …cdef")
    page.until(lambda: page.el("#model").get_attribute("value") == "tiny", 20, "the models")
    assert "random weights: its images are noise" in page.text("#model-note")

    # Submit; the card follows the event stream: waiting, steps, then the image.
    page.driver.execute_script(
        "window.seen = []; new MutationObserver(() => document.querySelectorAll('#jobs .line')"
        ".forEach((l) => seen.push(l.textContent))).observe(document.getElementById('jobs'),"
        " {childList: true, subtree: true});"
    )
    page.type("#prompt", "a lighthouse at dusk, oil painting")
    page.set("size", "128x128")
    page.set("steps", 20)
    page.el('#num_images button[data-value="2"]').click()
    job_id = page.submit()
    stepping = re.compile(r"step ([3-9]|1\d) of 20")
    page.until(lambda: stepping.search(page.card(job_id)) or page.all(".job img"), 120, "steps")
    if not page.all(".job img"):
        page.shot("progress")

    def shown() -> bool:
        widths = "return [...document.querySelectorAll('.job img')].map((i) => i.naturalWidth)"
        return bool(page.driver.execute_script(widths) == [128, 128])

    page.until(shown, 120, "two 128-pixel images")
    card = page.el(".job")
    assert page.text(".job .state") == "succeeded"
    assert "a lighthouse at dusk, oil painting" in card.text
    assert "128\u00d7128 · 20 steps" in card.text
    seen = page.driver.execute_script("return seen")
    assert any(re.fullmatch(r"step \d+ of 20", line) for line in seen), seen
    page.shot("create")

    # The job view: parameters, seed, timings; "again with this seed" fills the form.
    page.click(".job .foot a")
    page.until(lambda: page.text(".jobview h1") == "a lighthouse at dusk, oil painting", 20)
    with client_for(gateway) as client:
        job = client.get(f"/v1/jobs/{job_id}").json()
        first_image = client.get(job["outputs"][0]["url"]).content
    seed = job["request"]["seed"]
    view = page.text(".jobview")
    assert f"{seed} … {seed + 1}" in view
    assert "in the queue" in view
    assert "running" in view
    assert len(page.all(".shots img")) == 2
    page.shot("job")
    page.el("#again").click()
    page.until(lambda: page.el("#seed").get_attribute("value") == str(seed), 20, "the seed kept")
    assert page.el("#prompt").get_attribute("value") == "a lighthouse at dusk, oil painting"
    assert page.el("#size").get_attribute("value") == "128x128"
    assert page.text("#status").startswith(f"seed {seed} kept")

    # An image input: uploaded from the file picker, then img2img.
    png = tmp_path / "input.png"
    png.write_bytes(first_image)
    page.el('#task button[data-value="img2img"]').click()
    page.el("#image").send_keys(str(png))
    page.until(lambda: page.text("#image-state") == "input.png ✓", 20, "the upload")
    page.set("steps", 4)
    redone = page.submit()
    page.until(lambda: page.state(redone) == "succeeded", 120, "the img2img job")
    with client_for(gateway) as client:
        assert client.get(f"/v1/jobs/{redone}").json()["request"]["task"] == "img2img"

    # A long job runs; one behind it waits, its place in line shown; the long one is canceled.
    page.el('#task button[data-value="txt2img"]').click()
    page.el('#num_images button[data-value="1"]').click()
    page.set("seed", "")
    page.type("#prompt", "a very long job")
    page.set("size", "512x512")
    page.set("steps", 150)
    long_job = page.submit()
    page.until(lambda: page.state(long_job) == "running", 60, "the long job running")
    page.type("#prompt", "a harbour at night")
    page.set("size", "64x64")
    page.set("steps", 10)
    behind = page.submit()
    in_line = re.compile(r"(next|\d+(st|nd|rd|th)) in line")
    page.until(lambda: in_line.search(page.card(behind)), 20, "the place in line")
    page.shot("queue")
    page.click(f'#jobs [data-job="{long_job}"] button.danger')
    page.until(lambda: page.state(long_job) == "canceled", 30, "the cancel")
    # A pipeline call whose every row is canceled ends its worker (its supervisor starts a new
    # one: the scaler under `dq up`); here the test does. The job behind then runs.
    worker_factory(env)
    page.until(lambda: page.state(behind) == "succeeded", 120, "the job that waited")

    # A refusal: the message in words, its field marked.
    page.type("#prompt", "   ")
    page.el("#go").click()
    page.until(lambda: page.el("#form-error").is_displayed(), 20, "the refusal")
    refusal = "Refused (422): prompt: prompt must contain some text"
    assert page.text("#form-error") == refusal
    assert "invalid" in page.el('.field[data-field="prompt"]').get_attribute("class")
    page.shot("error")

    # The gallery: the caller's jobs, newest first.
    page.go("#/gallery")
    page.until(lambda: len(page.all(".tile")) == 4, 20, "four tiles")
    states = page.driver.execute_script(
        "return [...document.querySelectorAll('.tile .state')].map((s) => s.textContent)"
    )
    assert states == ["succeeded", "canceled", "succeeded", "succeeded"]
    assert page.el("#older").get_attribute("disabled") == "true"
    page.shot("gallery")

    # The operator view: tiles, depth over time, models; nothing of the admin part for a user.
    page.go("#/operator")
    page.until(lambda: len(page.all("#chart path")) == 4, 20, "a chart with two samples")
    burst = {"prompt": "busy", "width": 64, "height": 64, "steps": 10}  # seen for a few seconds
    with client_for(gateway) as client:
        ids = [client.post("/v1/jobs", json=burst).json()["id"] for _ in range(16)]
        page.until(lambda: sum(depth(page)) > 0, 30, "the burst in the tiles")
        for burst_id in ids:
            wait_for(client, burst_id, timeout=180)
    page.until(lambda: depth(page) == (0, 0), 20, "the queue drained")
    page.until(lambda: "Workers\n1\n" in page.text("#tiles"), 20, "one live worker")
    assert "tiny" in page.text("#models-table")
    assert not page.el("#admin").is_displayed()
    page.shot("operator")
    assert page.problems() == []


@pytest.mark.browser
def test_a_wrong_key_is_refused_in_words(gateway: Gateway, browser: Any, shots: Path) -> None:
    page = Page(browser, gateway.url, shots)
    page.open()
    enter_key(page, "not-a-key-of-this-server-at-all")
    page.until(lambda: page.text("#key-form .problem") != "", 20, "the refusal")
    assert page.text("#key-form .problem") == "this key is not valid here"
    assert page.el("#key-dialog").is_displayed()


@pytest.mark.browser
def test_the_key_is_kept_for_the_tab(gateway: Gateway, browser: Any, shots: Path) -> None:
    page = Page(browser, gateway.url, shots)
    page.open()
    enter_key(page, ALICE_KEY)
    page.until(lambda: page.el("#view-create").is_displayed(), 20)
    page.open("/#/gallery")
    page.until(lambda: page.el("#view-gallery").is_displayed(), 20, "the gallery, no key asked")
    assert not page.el("#key-dialog").is_displayed()
    assert page.driver.execute_script("return sessionStorage.getItem('dq.key')") == ALICE_KEY


@pytest.fixture
def admin_gateway(env: dict[str, str]) -> Iterator[Gateway]:
    """A gateway with an admin key, and a job queued (so the whole queue has a model in it)."""
    gw = Gateway(settings_from({**env, "DQ_API_KEYS": f"{TEST_KEYS},ops:{ADMIN_KEY}:admin"}))
    gw.start()
    with client_for(gw) as alice:
        assert alice.post("/v1/jobs", json={"prompt": "queued"}).status_code == 202
    yield gw
    gw.stop()


@pytest.mark.browser
def test_the_admin_part_shows_for_an_admin_key_only(
    admin_gateway: Gateway, browser: Any, shots: Path
) -> None:
    page = Page(browser, admin_gateway.url, shots)
    page.open("/#/operator")
    enter_key(page, ADMIN_KEY)
    page.until(lambda: page.el("#admin").is_displayed(), 20, "the admin part")
    assert "tiny" in page.text("#admin-body")
    assert "normal" in page.text("#admin-body")
    page.driver.execute_script("sessionStorage.clear()")
    page.driver.refresh()
    enter_key(page, ALICE_KEY)
    page.until(lambda: page.el("#admin-note").is_displayed(), 20, "the note for a user key")
    assert not page.el("#admin").is_displayed()
    assert page.text("#admin-note").endswith("need an admin key.")


def policy(gateway: Gateway) -> dict[str, str]:
    """The page's Content-Security-Policy, directive by directive."""
    header = httpx.get(f"{gateway.url}/").headers["content-security-policy"]
    return dict(d.strip().split(" ", 1) for d in header.split(";"))


def test_the_page_may_call_and_show_this_gateway_and_the_public_url_only(
    env: dict[str, str], gateway_factory: Callable[[dict[str, str]], Gateway]
) -> None:
    gateway = gateway_factory({**env, "DQ_PUBLIC_URL": "http://localhost:9999"})
    assert policy(gateway) == {
        "default-src": "'none'",
        "script-src": "'self'",
        "style-src": "'self'",
        "img-src": "'self' data: blob: http://localhost:9999",
        "connect-src": "'self' http://localhost:9999",
        "base-uri": "'none'",
        "form-action": "'self'",
        "frame-ancestors": "'none'",
    }


def test_with_s3_the_page_may_upload_to_and_show_the_bucket(
    env: dict[str, str], gateway_factory: Callable[[dict[str, str]], Gateway], s3_endpoint: str
) -> None:
    s3 = {"DQ_STORAGE_URL": "s3://images/out", "DQ_S3_ENDPOINT_URL": s3_endpoint}
    found = policy(gateway_factory({**env, **s3}))
    assert found["connect-src"] == f"'self' {s3_endpoint}"
    assert found["img-src"] == f"'self' data: blob: {s3_endpoint}"


def test_the_pages_files_are_served_by_name_and_nothing_else(gateway: Gateway) -> None:
    for name, kind in [
        ("app.js", "text/javascript"),
        ("app.css", "text/css"),
        ("icon.svg", "image/svg+xml"),
    ]:
        reply = httpx.get(f"{gateway.url}/page/{name}")
        assert (reply.status_code, reply.headers["content-type"].split(";")[0]) == (200, kind)
        assert reply.headers["cache-control"] == "no-cache"
    for name in ("nothing.js", "..%2Fpage.py", "%2E%2E%2Findex.html", "app.js%00.py"):
        reply = httpx.get(f"{gateway.url}/page/{name}")
        assert reply.status_code == 404, name
        assert reply.json()["error"]["code"] == "not_found"
    html = httpx.get(f"{gateway.url}/").text
    assert not re.search(r"<script>|<style>| style=| on[a-z]+=", html)  # nothing inline
    for url in re.findall(r'(?:src|href)="([^"#]+)"', html):
        assert httpx.get(gateway.url + url).status_code == 200, url


@pytest.mark.browser
def test_the_gallery_pages_through_the_keys_jobs(
    gateway: Gateway, browser: Any, shots: Path
) -> None:
    with client_for(gateway) as client:  # no worker: they stay queued
        for i in range(26):
            client.post("/v1/jobs", json={"prompt": f"job {i}"}).raise_for_status()
    page = Page(browser, gateway.url, shots)
    page.open("/#/gallery")
    enter_key(page, ALICE_KEY)
    prompts = "return [...document.querySelectorAll('.tile .prompt')].map((p) => p.textContent)"
    page.until(lambda: len(page.all(".tile")) == 24, 20, "a first page")
    assert page.driver.execute_script(prompts)[:2] == ["job 25", "job 24"]
    assert page.text("#page-no") == "page 1"
    page.el("#older").click()
    page.until(lambda: page.driver.execute_script(prompts) == ["job 1", "job 0"], 20, "page 2")
    assert page.el("#older").get_attribute("disabled") == "true"
    page.el("#newer").click()
    page.until(lambda: len(page.all(".tile")) == 24, 20, "the first page again")
    page.el('#filter button[data-value="succeeded"]').click()
    page.until(lambda: page.text("#gallery") == "No succeeded jobs.", 20, "an empty filter")


@pytest.mark.browser
def test_loras_and_an_inpainting_refusal_on_its_field(
    env: dict[str, str],
    gateway_factory: Callable[[dict[str, str]], Gateway],
    browser: Any,
    shots: Path,
    tmp_path: Path,
) -> None:
    from worker.models import build_tiny_lora

    build_tiny_lora(tmp_path / "loras" / "noise.safetensors", "tiny")
    gateway = gateway_factory({**env, "DQ_LORAS": str(tmp_path / "loras")})
    page = Page(browser, gateway.url, shots)
    page.open()
    enter_key(page, ALICE_KEY)
    page.until(lambda: page.el("#loras-block").is_displayed(), 20, "the LoRA block")
    page.el("#add-lora").click()
    page.set_in("#loras .lora input", "0.6")
    page.type("#prompt", "pixel art harbour")
    job_id = page.submit()
    with client_for(gateway) as client:
        request = client.get(f"/v1/jobs/{job_id}").json()["request"]
    assert request["loras"] == [{"name": "noise", "scale": 0.6}]

    # Inpainting without an image: refused, and the image field says so.
    page.el('#task button[data-value="inpaint"]').click()
    assert page.el("#mask-field").is_displayed()
    page.el("#go").click()
    page.until(lambda: page.el("#form-error").is_displayed(), 20, "the refusal")
    image_field = page.el('.field[data-field="image"]')
    assert "invalid" in image_field.get_attribute("class")
    assert "image" in page.text('.field[data-field="image"] .problem')
