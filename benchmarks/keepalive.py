"""What a real HTTP client sees: kept-alive connections against a fresh one per request.

Every real client (tritonclient, ``requests.Session``, browsers) keeps its connection alive.
A server that leaves Nagle's algorithm on stalls each kept-alive response ~40 ms on the
client's delayed ACK; this measures it. With ``--url`` it measures a running server;
without, it starts ``armdi up`` itself (``--model``, ``--nodes``) and stops it afterwards.

    .venv/bin/python benchmarks/keepalive.py                       # armdi up, default model
    .venv/bin/python benchmarks/keepalive.py --url http://127.0.0.1:8000

It prints p50/p99 of ``GET /v2/health/ready`` over one kept-alive connection, and of
``POST /v1/classify`` (a 224x224 JPEG of the scikit-image cat, or ``--image``) kept alive
against a fresh connection per request, measured interleaved so both see the same load.
This is a benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import socket
import statistics
import subprocess
import sys
import time
import urllib.parse
import uuid
from pathlib import Path


def _jpeg(path: Path | None) -> bytes:
    if path is not None:
        return path.read_bytes()
    import skimage.data
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(skimage.data.chelsea()).resize((224, 224)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _multipart(image: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"cat.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n").encode() + image + \
        f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def _timed(conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None,
           headers: dict[str, str] | None = None) -> float:
    t0 = time.perf_counter()
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    response.read()
    if response.status != 200:
        raise RuntimeError(f"{method} {path}: HTTP {response.status}")
    return (time.perf_counter() - t0) * 1000


def _stats(values: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50_ms": round(statistics.median(values), 3), "p99_ms": round(cuts[98], 3),
            "n": len(values)}


def measure(url: str, image: bytes, requests: int) -> dict[str, object]:
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    body, ctype = _multipart(image)
    headers = {"Content-Type": ctype}
    kept = http.client.HTTPConnection(host, port, timeout=30)
    for _ in range(10):  # warm-up
        _timed(kept, "GET", "/v2/health/ready")
        _timed(kept, "POST", "/v1/classify", body, headers)
    health = [_timed(kept, "GET", "/v2/health/ready") for _ in range(requests)]
    classify_kept, classify_fresh = [], []
    for _ in range(requests):
        classify_kept.append(_timed(kept, "POST", "/v1/classify", body, headers))
        fresh = http.client.HTTPConnection(host, port, timeout=30)
        try:
            classify_fresh.append(_timed(fresh, "POST", "/v1/classify", body, headers))
        finally:
            fresh.close()
    kept.close()
    k, f = _stats(classify_kept), _stats(classify_fresh)
    return {
        "url": url, "image_bytes": len(image),
        "health_ready_kept_alive": _stats(health),
        "classify_kept_alive": k, "classify_fresh_connection": f,
        "classify_kept_minus_fresh_p50_ms": round(k["p50_ms"] - f["p50_ms"], 3),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running armdi server (default: start armdi up)")
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--repo", help="model repository for armdi up")
    parser.add_argument("--image", type=Path, help="a JPEG to classify (default: the cat)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    image = _jpeg(args.image)
    proc = None
    url = args.url
    if url is None:
        port = _free_port()
        cmd = [sys.executable, "-m", "appliance.cli", "--log-level", "WARNING", "up",
               "--model", args.model, "--nodes", str(args.nodes), "--port", str(port)]
        if args.repo:
            cmd += ["--repo", args.repo]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                _timed(conn, "GET", "/v2/health/ready")
                conn.close()
                break
            except (OSError, RuntimeError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    sys.exit("armdi up did not become ready")
                time.sleep(0.5)
    try:
        result = measure(url, image, args.requests)
    finally:
        if proc is not None:
            proc.send_signal(2)
            proc.wait(timeout=30)
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
