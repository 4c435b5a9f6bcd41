"""A real cluster as the README sets one up, on one machine: separate "hosts" (separate
model repositories and processes, talking over tcp://), the model built once and shipped.

    host A   builds the model, packs it, runs ``armdi serve`` (the source)
    host B   ``armdi unpack`` of A's pack, runs worker w1 — in its own network namespace
             behind a veth pair where this runs as root, else on loopback
    host C   builds the same model again from another copy of the ONNX file whose exporter
             metadata names another checkout: the same fingerprint, so worker w2 is accepted
    host D   builds the model with other weights: worker w3 is refused, and ``armdi serve``
             names it with the commands that fix it

Without root (or ``ip``, or namespaces in the container) host B is on loopback too: still its
own repository and process, only not its own network stack.

The answers that come back through ``/v2/models/tiny/infer`` equal the full model run alone.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from engines.device import device_signature
from engines.manifest import Manifest
from engines.repository import MANIFEST, ModelRepository, write_json_atomic
from tests.conftest import (
    BuiltModel,
    build_tiny,
    residual_net,
    run_onnx,
    save,
    with_export_metadata,
)

PY = sys.executable


def _move_profiles_to_another_device(repo: Path) -> None:
    path = repo / "tiny" / MANIFEST
    manifest = Manifest.model_validate_json(path.read_text())
    moved = {f"another-device/{p.backend}/t{p.threads}": p.model_copy(
        update={"device": "another-device"}) for p in manifest.profiles.values()}
    write_json_atomic(path, manifest.model_copy(update={"profiles": moved}).model_dump(
        mode="json"))


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _run(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, PY, "-m", "appliance.cli", *args], capture_output=True,
                          text=True, timeout=120)


@contextlib.contextmanager
def _namespace() -> Iterator[tuple[str, str, tuple[str, ...]]]:
    """``(host_ip, ns_ip, prefix)``: a network namespace joined to this one by a veth pair,
    and the command prefix that runs a process inside it. Loopback without root."""
    ip = shutil.which("ip")
    if os.geteuid() != 0 or ip is None:
        yield "127.0.0.1", "127.0.0.1", ()
        return
    pid = os.getpid()
    name, veth = f"armdi-t8-{pid}", f"a8h{pid % 100000}"
    subnet = f"172.31.{pid % 250}.{(pid // 250) % 60 * 4}"
    base = subnet.rsplit(".", 1)
    host_ip, ns_ip = f"{base[0]}.{int(base[1]) + 1}", f"{base[0]}.{int(base[1]) + 2}"
    setup = [
        [ip, "netns", "add", name],
        [ip, "link", "add", veth, "type", "veth", "peer", "name", "a8ns"],
        [ip, "link", "set", "a8ns", "netns", name],
        [ip, "addr", "add", f"{host_ip}/30", "dev", veth],
        [ip, "link", "set", veth, "up"],
        [ip, "netns", "exec", name, ip, "addr", "add", f"{ns_ip}/30", "dev", "a8ns"],
        [ip, "netns", "exec", name, ip, "link", "set", "a8ns", "up"],
        [ip, "netns", "exec", name, ip, "link", "set", "lo", "up"],
    ]
    try:
        for cmd in setup:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            if proc.returncode != 0:
                raise OSError(f"{' '.join(cmd)}: {proc.stderr.strip()}")
    except OSError:
        subprocess.run([ip, "link", "del", veth], capture_output=True, timeout=10)
        subprocess.run([ip, "netns", "del", name], capture_output=True, timeout=10)
        yield "127.0.0.1", "127.0.0.1", ()  # no namespaces in this container: loopback
        return
    try:
        yield host_ip, ns_ip, (ip, "netns", "exec", name)
    finally:
        subprocess.run([ip, "link", "del", veth], capture_output=True, timeout=10)
        subprocess.run([ip, "netns", "del", name], capture_output=True, timeout=10)


def _config(host_ip: str, ns_ip: str) -> str:
    ips = {"source": host_ip, "w1": ns_ip, "w2": host_ip, "w3": host_ip}
    # Ports free here; the namespace is new, so they are free there too.
    ports = {name: (_free_port("127.0.0.1"), _free_port("127.0.0.1")) for name in ips}

    def addrs(name: str) -> str:
        data, control = ports[name]
        return (f'data_addr = "tcp://{ips[name]}:{data}"\n'
                f'control_addr = "tcp://{ips[name]}:{control}"\n')

    workers = "".join(f'\n[[workers]]\nname = "{n}"\n{addrs(n)}max_blocks = 6\n'
                      for n in ("w1", "w2", "w3"))
    return ('[cluster]\nmodel = "tiny"\nrepo = "repo"\nmode = "edgepipe"\nbackend = "ort"\n\n'
            f'[source]\nname = "source"\n{addrs("source")}run_blocks = false\n'
            'http_host = "127.0.0.1"\nhttp_port = 0\n' + workers)  # serve prints the port


def _host(tmp: Path, name: str, config: str) -> Path:
    """A "host": its own folder, with its own cluster.toml (``repo = "repo"`` is relative to
    it, so every host has its own model repository)."""
    home = tmp / name
    home.mkdir(parents=True, exist_ok=True)
    (home / "cluster.toml").write_text(config)
    return home


def _stop(procs: list[subprocess.Popen[str]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _wait_for_line(proc: subprocess.Popen[str], text: str, timeout_s: float) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    seen = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if text in line:
            return line
    if proc.poll() is None:
        proc.terminate()
    _, err = proc.communicate(timeout=10)
    raise AssertionError(f"no {text!r} in the output: {''.join(seen)}; stderr: {err}")


def _pipeline_when_polled(url: str, timeout_s: float = 20.0) -> dict[str, Any]:
    """``/v1/pipeline`` once the source has polled the workers it used (once a second)."""
    deadline = time.monotonic() + timeout_s
    while True:
        pipeline: dict[str, Any] = httpx.get(url, timeout=10).json()
        nodes = pipeline["nodes"]
        assert isinstance(nodes, list)
        if all(n["processed"] > 0 for n in nodes if n["name"] in ("w1", "w2")) \
                or time.monotonic() > deadline:
            return pipeline
        time.sleep(0.2)


def test_built_once_shipped_served_over_tcp(built_tiny: BuiltModel, tmp_path: Path) -> None:
    with _namespace() as (host_ip, ns_ip, in_ns):
        config = _config(host_ip, ns_ip)
        a, b, c, d = (_host(tmp_path, n, config) for n in ("a", "b", "c", "d"))
        # A: the build (the session's), packed; as if built on another kind of device.
        shutil.copytree(built_tiny.repo, a / "repo")
        _move_profiles_to_another_device(a / "repo")
        packed = _run("pack", "tiny", "-o", str(a / "tiny.tar"), "--repo", str(a / "repo"))
        assert packed.returncode == 0, packed.stderr
        # B: unpacks the copy of A's pack it was given.
        shutil.copy(a / "tiny.tar", b / "tiny.tar")
        unpacked = _run("unpack", str(b / "tiny.tar"), "--repo", str(b / "repo"))
        assert unpacked.returncode == 0, unpacked.stderr
        # C: the same model exported from "another checkout"; D: other weights.
        build_tiny(save(with_export_metadata(residual_net(0), "/home/else/armdi"),
                        c / "src" / "tiny.onnx"), c / "repo", segments="blocks")
        build_tiny(save(residual_net(1), d / "src" / "tiny.onnx"), d / "repo",
                   segments="blocks")
        fingerprints = {h.name: ModelRepository(h / "repo").load_manifest("tiny").fingerprint
                        for h in (a, b, c, d)}
        here = device_signature()
        unpacked_profiles = ModelRepository(b / "repo").load_manifest("tiny").profiles
        assert {p.device for p in unpacked_profiles.values()} >= {"another-device", here}
        assert fingerprints["a"] == fingerprints["b"] == fingerprints["c"] != fingerprints["d"]

        procs: list[subprocess.Popen[str]] = []
        try:
            for home, name, prefix in ((b, "w1", in_ns), (c, "w2", ()), (d, "w3", ())):
                procs.append(subprocess.Popen(
                    [*prefix, PY, "-m", "appliance.cli", "--log-level", "WARNING", "node",
                     "--config", str(home / "cluster.toml"), "--name", name],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True))
            serve = subprocess.Popen(
                [PY, "-m", "appliance.cli", "--log-level", "ERROR", "serve", "--config",
                 str(a / "cluster.toml")],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            procs.append(serve)
            url = _wait_for_line(serve, "armdi serving tiny at", 90).split(" at ")[1].strip()
            refused = _wait_for_line(serve, "w3 runs no blocks", 10)
            x = np.random.default_rng(5).standard_normal((8, 3, 8, 8)).astype(np.float32)
            response = httpx.post(f"{url}v2/models/tiny/infer", json={
                "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                            "data": x.ravel().tolist()}]}, timeout=60)
            pipeline = _pipeline_when_polled(f"{url}v1/pipeline")
        finally:
            _stop(procs)
    # The source had no profile of this device: serve made one at its first start.
    profiles = ModelRepository(a / "repo").load_manifest("tiny").profiles.values()
    assert any(p.device == here and len(p.block_ms) == 11 for p in profiles)
    assert response.status_code == 200, response.text
    got = np.asarray(response.json()["outputs"][0]["data"], np.float32).reshape(8, -1)
    expected = run_onnx(a / "repo" / "tiny" / "model.onnx", x)[0]
    assert np.max(np.abs(got - expected)) <= 1e-5
    states = {n["name"]: n["state"] for n in pipeline["nodes"]}
    alive = ("up", "slow")  # slow: alive, measured slower than the others on a busy machine
    assert states["w1"] in alive and states["w2"] in alive and states["w3"] == "refused", states
    worked = {n["name"]: n["processed"] for n in pipeline["nodes"] if n["role"] == "worker"}
    assert worked["w1"] > 0 and worked["w2"] > 0 and worked["w3"] == 0, worked
    # armdi serve named the refused worker, why, and the commands that fix it.
    assert refused.startswith(f"  w3 runs no blocks: w3 serves tiny fingerprint "
                              f"{fingerprints['d'][:12]}, the source has "
                              f"{fingerprints['a'][:12]}"), refused
    assert f"armdi pack tiny -o tiny.tar --repo {a / 'repo'}" in refused
    assert "armdi unpack tiny.tar" in refused
