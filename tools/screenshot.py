"""``make screenshot``: the status page under load, as the README shows it.

Starts ``armdi up`` on the default model, keeps a few clients classifying scikit-image's
photos through it, opens the page in Debian's chromium (Playwright, headless), slows one
worker down a third of the way in (``--slow``, emulated) so the adaptive chain has moves to
show, drops three photos on the page, and writes a full-page PNG (quantised to stay small)
under docs/. Stops everything it started. The test suite takes no screenshot.

    .venv/bin/python tools/screenshot.py [--out docs/status-page.png] [--nodes 3] [--seconds 40]
"""

from __future__ import annotations

import argparse
import http.client
import io
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from pathlib import Path

PHOTOS = ("chelsea", "coffee", "rocket", "astronaut")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def photos(folder: Path) -> list[Path]:
    import skimage.data
    from PIL import Image

    paths = []
    for name in PHOTOS:
        path = folder / f"{name}.jpg"
        Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(path, quality=90)
        paths.append(path)
    return paths


def start_up(args: argparse.Namespace) -> tuple[subprocess.Popen[str], str]:
    armdi = Path(sys.executable).with_name("armdi")
    command = [str(armdi), "--log-level", "WARNING", "up", "--model", args.model, "--nodes",
               str(args.nodes), "--min-workers", str(args.nodes), "--port", "0"]
    if args.slowdown:
        command += ["--slowdown", args.slowdown]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    deadline = time.monotonic() + 600  # the first run builds the model
    for line in process.stdout:
        print(line, end="", flush=True)
        match = re.search(r"web front end: (http://\S+)", line)
        if match:
            threading.Thread(target=lambda: [None for _ in process.stdout],  # type: ignore
                             daemon=True).start()
            return process, match.group(1)
        if time.monotonic() > deadline:
            break
    process.kill()
    raise SystemExit("armdi up did not print its URL")


def load(url: str, images: list[Path], stop: threading.Event, index: int) -> None:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80,
                                      timeout=30)
    boundary = uuid.uuid4().hex
    bodies = [(f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
               f"filename=\"{p.name}\"\r\nContent-Type: image/jpeg\r\n\r\n").encode()
              + p.read_bytes() + f"\r\n--{boundary}--\r\n".encode() for p in images]
    n = index
    while not stop.is_set():
        conn.request("POST", "/v1/classify", body=bodies[n % len(bodies)],
                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        conn.getresponse().read()
        n += 1
        time.sleep(0.005)
    conn.close()


def slow(url: str, spec: str) -> None:
    """PUT /v1/nodes/NODE/slowdown, as ``armdi slow NODE FACTOR`` does."""
    import json

    node, factor = spec.split(":")
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80,
                                      timeout=30)
    conn.request("PUT", f"/v1/nodes/{node}/slowdown", body=json.dumps({"factor": float(factor)}),
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    print(f"slowdown {spec}: HTTP {response.status} {response.read().decode()}")
    conn.close()


def shrink(png: bytes, out: Path) -> None:
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    image.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/status-page.png"))
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--slowdown", default=None, help="e.g. 1,1,2")
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=40.0, help="load before the shot")
    parser.add_argument("--slow", default="w2:3",
                        help="NODE:FACTOR slowed down a third of the way in, so the page has "
                             "moves to show ('' for none)")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("chromium is not installed (apt install chromium)")
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        images = photos(Path(tmp))
        process, url = start_up(args)
        stop = threading.Event()
        clients = [threading.Thread(target=load, args=(url, images, stop, i), daemon=True)
                   for i in range(args.clients)]
        try:
            for client in clients:
                client.start()
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1280, "height": 900},
                                        device_scale_factor=1)
                page.goto(url)
                page.wait_for_selector("#blockbar .seg", timeout=30_000)
                time.sleep(args.seconds / 3)
                if args.slow:
                    slow(url, args.slow)
                time.sleep(max(0.0, args.seconds * 2 / 3 - 5))
                page.set_input_files("#file", [str(p) for p in images[:3]])
                page.wait_for_function(
                    "document.querySelectorAll('.answer[data-label]').length >= 3",
                    timeout=60_000)
                time.sleep(5)
                png = page.screenshot(full_page=True)
                browser.close()
        finally:
            stop.set()
            for client in clients:
                client.join(timeout=10)
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    shrink(png, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
