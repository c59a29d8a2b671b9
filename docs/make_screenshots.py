"""Screenshots of the viewer for the README: ``python docs/make_screenshots.py [--weights W]``.

Starts ``fundus serve`` on a free loopback port with the given (default: bundled) weights, opens
``/ui`` in Debian's headless Chromium, loads the bundled sample photograph and writes
``docs/ui-empty.png``, ``docs/ui-result.png`` and ``docs/ui-vessels.png``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "service" / "samples" / "hrf-06_h.jpg"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=str(ROOT / "model" / "weights" / "tmagenet-lite.safetensors"))
    args = parser.parse_args()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "FUNDUS_WEIGHTS": args.weights, "FUNDUS_PORT": str(port), "FUNDUS_HOST": "127.0.0.1",
           "FUNDUS_DEVICE": "cpu", "FUNDUS_LOG_LEVEL": "WARNING"}  # fmt: skip
    server = subprocess.Popen([sys.executable, "-m", "service.cli", "serve"], env=env, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)  # polling the start-up
        from playwright.sync_api import sync_playwright

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 860}, device_scale_factor=1)
            page.goto(f"{base}/ui")
            page.screenshot(path=str(ROOT / "docs" / "ui-empty.png"))
            page.set_input_files("#file", str(SAMPLE))
            page.wait_for_selector("#viewport[data-ready='true']", timeout=120_000)
            page.screenshot(path=str(ROOT / "docs" / "ui-result.png"))
            page.check("input[name='overlay'][value='after']")
            page.screenshot(path=str(ROOT / "docs" / "ui-vessels.png"))
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
