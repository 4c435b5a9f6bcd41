"""``armdi up`` as a user runs it: a real process tree, HTTP, then Ctrl-C."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import BuiltModel


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            pids.append(int(entry.name))
    return pids


def _png() -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["armdi", "ddi"])
def test_up_serves_then_ctrl_c_leaves_no_process_and_no_socket(built_tiny: BuiltModel,
                                                                tmp_path: Path,
                                                                mode: str) -> None:
    run_dir = tmp_path / "run"
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance.cli", "--log-level", "WARNING", "up", "--repo",
         str(built_tiny.repo), "--model", "tiny", "--nodes", "2", "--min-workers", "2",
         "--port", str(port), "--run-dir", str(run_dir), "--mode", mode],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "armdi up never became ready"
            time.sleep(0.2)
        workers = [p for p in _processes_mentioning(str(run_dir)) if p != proc.pid]
        assert len(workers) == 2, workers
        sockets = ["source.data", "w1.ctl", "w1.data", "w2.ctl", "w2.data"]
        if mode == "armdi":  # boundary moves reach the source on its control socket
            sockets.insert(0, "source.ctl")
        assert sorted(p.name for p in run_dir.iterdir() if p.is_socket()) == sockets
        reply = httpx.post(f"{url}/v1/classify", files={"file": ("x.png", _png(), "image/png")},
                           timeout=30)
        assert reply.status_code == 200, reply.text
        body = reply.json()
        if mode == "ddi":  # one worker ran the whole model
            assert len(body["path"]) == 1 and body["path"][0]["node"] in ("source", "w1", "w2")
            assert body["path"][0]["blocks"] == [0, built_tiny.manifest.blocks]
        else:  # --min-workers 2: both workers are in the chain whatever the timings
            assert [h["node"] for h in body["path"]][-2:] == ["w1", "w2"]
            assert body["path"][-1]["blocks"][1] == built_tiny.manifest.blocks
        bad = httpx.post(f"{url}/v1/classify", files={"file": ("x.png", b"\x89PNG\r\n\x1a\nxx",
                                                               "image/png")}, timeout=30)
        assert bad.status_code == 400
        assert httpx.get(f"{url}/v2/health/ready", timeout=5).status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, output
    assert "armdi up: stopped" in output
    assert "Traceback" not in output, output  # a clean Ctrl-C
    deadline = time.monotonic() + 5
    while _processes_mentioning(str(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes_mentioning(str(run_dir)) == []
    assert [p.name for p in run_dir.iterdir()] == ["cluster.toml"]


def test_up_on_a_port_in_use_fails_cleanly_before_starting_workers(built_tiny: BuiltModel,
                                                                     tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "appliance.cli", "up", "--repo", str(built_tiny.repo),
             "--model", "tiny", "--nodes", "2", "--port", str(port), "--run-dir", str(run_dir)],
            capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: cannot listen on"), done.stderr
    assert "Traceback" not in done.stderr
    assert _processes_mentioning(str(run_dir)) == []


def test_up_with_an_api_token_file_refuses_requests_without_it(built_tiny: BuiltModel,
                                                                tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("t0ken\n")
    env = {k: v for k, v in os.environ.items() if k != "ARMDI_API_TOKEN"}
    proc = subprocess.Popen(  # port 0: no race with other processes for a free port
        [sys.executable, "-m", "appliance.cli", "--log-level", "WARNING", "up", "--repo",
         str(built_tiny.repo), "--model", "tiny", "--nodes", "0", "--port", "0",
         "--api-token-file", str(token_file), "--run-dir", str(tmp_path / "run")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout or ()), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while not any("web front end:" in line for line in list(lines)):
            assert proc.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "armdi up never printed its URL"
            time.sleep(0.1)
        url = next(line for line in list(lines) if "web front end:" in line).split()[-1]
        url = url.rstrip("/")
        while httpx.get(f"{url}/v2/health/ready", timeout=5).status_code != 200:  # no token
            assert time.monotonic() < deadline, "armdi up never became ready"
            time.sleep(0.2)
        assert httpx.get(f"{url}/v1/pipeline", timeout=5).status_code == 401
        refused = httpx.post(f"{url}/v1/classify", files={"file": ("x.png", _png())}, timeout=5)
        assert refused.status_code == 401
        headers = {"Authorization": "Bearer t0ken"}
        assert httpx.get(f"{url}/v1/pipeline", headers=headers, timeout=5).status_code == 200
        reply = httpx.post(f"{url}/v1/classify", files={"file": ("x.png", _png())},
                           headers=headers, timeout=30)
        assert reply.status_code == 200, reply.text
        assert httpx.get(f"{url}/", timeout=5).status_code == 200  # the page asks for it
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        reader.join(timeout=10)
    output = "".join(lines)
    assert proc.returncode == 0, output
    assert "API token required" in output and "warning" not in output
    assert "t0ken" not in output
