"""The load generator of ``armdi bench rest``: HTTP clients in a process of their own.

Standard library only, so it starts fast and costs what a lean client costs. It reads one JSON
command per line on stdin and answers one JSON line on stdout:

    {"op": "latency", "url": ..., "plan": ["jpeg", "v2", ...]}
        one request at a time over one kept-alive connection, in the order given;
        answers {"ms": [...], "kinds": [...]}
    {"op": "throughput", "url": ..., "kind": "v2", "clients": 4, "duration_s": 5}
        ``clients`` threads, each with its own kept-alive connection, sending back to back;
        answers {"completed": n, "rejected": n, "seconds": s, "cpu_s": this process's CPU}
    {"op": "quit"}

The request bodies come from the files named on the command line:
``python -m web.bench_client JPEG_FILE V2_BODY_FILE V2_HEADER_LENGTH MODEL``.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import sys
import threading
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

BOUNDARY = uuid.uuid4().hex


class Requests:
    """The two requests the benchmark sends: a JPEG to /v1/classify, a tensor to v2 infer."""

    def __init__(self, jpeg: bytes, v2_body: bytes, v2_header_length: int, model: str) -> None:
        self.jpeg_body = (
            f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"image.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n").encode() + jpeg + \
            f"\r\n--{BOUNDARY}--\r\n".encode()
        self.jpeg_headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
        self.v2_body = v2_body
        self.v2_headers = {"Content-Type": "application/octet-stream",
                           "Inference-Header-Content-Length": str(v2_header_length)}
        self.v2_path = f"/v2/models/{model}/infer"

    def send(self, conn: http.client.HTTPConnection, kind: str) -> int:
        """One request on ``conn``; its HTTP status (the body is read and dropped)."""
        if kind == "jpeg":
            conn.request("POST", "/v1/classify?top_k=5", body=self.jpeg_body,
                         headers=self.jpeg_headers)
        else:
            conn.request("POST", self.v2_path, body=self.v2_body, headers=self.v2_headers)
        response = conn.getresponse()
        response.read()
        return response.status


def _connect(url: str) -> http.client.HTTPConnection:
    parts = urllib.parse.urlsplit(url)
    return http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80,
                                      timeout=60)


def latency(requests: Requests, url: str, plan: list[str]) -> dict[str, Any]:
    conn = _connect(url)
    times: list[float] = []
    try:
        for kind in plan:
            t0 = time.perf_counter()
            status = requests.send(conn, kind)
            times.append((time.perf_counter() - t0) * 1000)
            if status != 200:
                raise RuntimeError(f"{kind}: HTTP {status}")
    finally:
        conn.close()
    return {"ms": times, "kinds": plan}


def throughput(requests: Requests, url: str, kind: str, clients: int,
               duration_s: float) -> dict[str, Any]:
    completed = [0] * clients
    rejected = [0] * clients
    errors: list[str] = []
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def client(index: int) -> None:
        conn = _connect(url)
        try:
            requests.send(conn, kind)  # connected and warm before the clock starts
            start.wait()
            while time.perf_counter() < stop_at[0]:
                status = requests.send(conn, kind)
                if status == 200:
                    completed[index] += 1
                elif status == 503:  # back-pressure: a real client retries shortly
                    rejected[index] += 1
                    time.sleep(0.002)
                else:
                    raise RuntimeError(f"{kind}: HTTP {status}")
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            start.abort()
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    stop_at[0] = time.perf_counter() + 3600.0
    with contextlib.suppress(threading.BrokenBarrierError):
        start.wait()
    t0, cpu0 = time.perf_counter(), time.process_time()
    stop_at[0] = t0 + duration_s
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - t0
    if errors:
        raise RuntimeError(errors[0])
    return {"completed": sum(completed), "rejected": sum(rejected), "seconds": seconds,
            "cpu_s": time.process_time() - cpu0}


def main(argv: list[str]) -> int:
    jpeg_file, v2_file, header_length, model = argv
    requests = Requests(Path(jpeg_file).read_bytes(), Path(v2_file).read_bytes(),
                        int(header_length), model)
    for line in sys.stdin:
        command = json.loads(line)
        op = command.pop("op")
        if op == "quit":
            break
        try:
            if op == "latency":
                answer = latency(requests, **command)
            elif op == "throughput":
                answer = throughput(requests, **command)
            else:
                raise ValueError(f"unknown op {op!r}")
        except Exception as exc:
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
