"""The viewer in a real headless Chromium against a real ``fundus serve``: upload a photograph of the
data pack, see the service's own answer on screen (pixel check), move the split, show the vessels,
play with a degradation, and read an API-key error as a sentence."""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.ops.monitoring import clean_environment, fundus_process, wait_ready
from tests.ops.support import free_port

CHROMIUM = shutil.which("chromium")
KEY = "viewer-test-key"
# Flags for a closed network: no background connections, no first-run work.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-quic",
]  # fmt: skip

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_artifact: Path) -> Iterator[str]:
    workdir = tmp_path_factory.mktemp("viewer")
    port = free_port()
    env = clean_environment(
        FUNDUS_WEIGHTS=str(tiny_artifact), FUNDUS_PORT=str(port), FUNDUS_HOST="127.0.0.1",
        FUNDUS_DEVICE="cpu", FUNDUS_WARMUP="false", FUNDUS_TORCH_THREADS="1", FUNDUS_API_KEYS=KEY,
        OMP_NUM_THREADS="1",
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    with fundus_process("serve", env, workdir) as process:
        wait_ready(base, process, workdir / "serve.log", timeout_s=120)
        yield base


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if CHROMIUM is None:
        pytest.fail("chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int16)


def test_viewer_end_to_end(server: str, browser: object, data_root: Path) -> None:
    photo = data_root / "chase_db1" / "images" / "Image_05L.jpg"
    page = browser.new_page(viewport={"width": 1280, "height": 900}, device_scale_factor=1)  # type: ignore[attr-defined]
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.goto(server + "/")
    assert page.url.endswith("/ui")
    assert page.get_by_label("API key").is_visible()

    # Without the key the service says why, in words.
    page.set_input_files("#file", str(photo))
    page.wait_for_selector("#error:not([hidden])")
    message = page.inner_text("#error")
    assert "API key" in message and "401" in message

    # With the key: the original, then the enhanced image and the vessels.
    page.fill("#key", KEY)
    page.click("#reset")
    page.wait_for_selector("#viewport[data-ready='true']", timeout=60_000)
    assert page.is_hidden("#error")
    assert "Server-Timing" in page.inner_text("#figures") and "model version" in page.inner_text("#figures")
    assert page.locator("#downloads a").count() >= 3

    # The split slider moves with the keyboard.
    page.focus("#split")
    for _ in range(10):
        page.keyboard.press("ArrowLeft")
    assert page.eval_on_selector("#split", "e => e.value") == "40"
    assert "40%" in page.eval_on_selector("#after-clip", "e => e.style.clipPath")

    # The vessel overlay on the enhanced side, then off again.
    page.check("input[name='overlay'][value='after']")
    assert page.is_visible("#overlay-after") and page.is_hidden("#overlay-before")
    page.check("input[name='overlay'][value='off']")
    assert page.is_hidden("#overlay-after")

    # What is on screen is the service's own answer: all "after", 1:1, top-left of the image.
    page.eval_on_selector("#split", "e => { e.value = 0; e.dispatchEvent(new Event('input')); }")
    page.click("#native")
    shown = _png(page.locator("#viewport").screenshot())
    expected = _png(
        httpx.post(
            f"{server}/enhance?format=png", content=photo.read_bytes(),
            headers={"content-type": "image/jpeg", "authorization": f"Bearer {KEY}"}, timeout=60,
        ).content
    )  # fmt: skip
    height, width = min(shown.shape[0], expected.shape[0]), min(shown.shape[1], expected.shape[1])
    difference = np.abs(shown[:height, :width] - expected[:height, :width]).mean()
    assert difference < 2.0, difference

    # The degradation playground: degrade, then enhance the degraded copy.
    page.click("#degrade")
    page.locator("#status", has_text="degraded copy").wait_for(timeout=60_000)
    assert page.locator("#downloads a", has_text="degraded").count() == 1

    # Nothing was requested from anywhere but this service.
    assert requests and all(
        url.startswith(server) or url.startswith(("blob:", "data:")) for url in requests
    ), requests
    page.close()


def test_viewer_works_at_tablet_width(server: str, browser: object) -> None:
    page = browser.new_page(viewport={"width": 768, "height": 1024}, device_scale_factor=1)  # type: ignore[attr-defined]
    page.goto(server + "/ui")
    box = page.locator("#viewport").bounding_box()
    assert box is not None and box["width"] > 600  # one column: the view gets the width
    assert page.locator("#file").is_enabled()
    page.close()
