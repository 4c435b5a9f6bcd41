"""The status page in a real headless Chromium (driven by Playwright), on a real cluster."""

from __future__ import annotations

import contextlib
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import uvicorn
from PIL import Image

from appliance.data.source import Source
from tests.conftest import BuiltModel
from tests.system.conftest import cluster
from web.app import create_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
pytestmark = pytest.mark.skipif(CHROMIUM is None,
                                reason="Chromium is not installed (apt install chromium)")


@contextlib.contextmanager
def _serve(source: Source) -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(source), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_status_page_shows_the_chain_and_classifies_an_upload(built_tiny: BuiltModel,
                                                                tmp_path: Path) -> None:
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8)).save(image)
    blocks = built_tiny.manifest.blocks
    # min_workers: both workers run blocks whatever this machine's timings say is optimal
    with cluster(built_tiny.repo, "tiny", tmp_path, nodes=2, min_workers=2) as source, \
            _serve(source) as url, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(url)
            page.wait_for_function("document.querySelectorAll('#chain .node').length >= 3",
                                   timeout=15_000)
            page.wait_for_function(
                f"document.querySelector('#chain').textContent.includes(', {blocks})')",
                timeout=15_000)
            chain = page.text_content("#chain") or ""
            model = page.text_content("#model") or ""
            page.set_input_files("#file", str(image))
            page.click("#upload button, #upload input[type=submit]")
            page.wait_for_function("document.querySelector('#answer').textContent"
                                   ".includes('path:')", timeout=15_000)
            answer = page.text_content("#answer") or ""
            page.screenshot(path=str(tmp_path / "status.png"), full_page=True)
        finally:
            browser.close()
    assert "tiny" in model
    for name in ("source", "w1", "w2"):
        assert name in chain, (name, chain)
    assert "w1" in answer and "w2" in answer, answer
    assert "end to end" in answer
    assert (tmp_path / "status.png").stat().st_size > 5000
