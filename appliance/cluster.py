"""``armdi up``: a whole cluster on one machine — N worker processes, the source and the web
front end — for demos, tests and benchmarks.

Workers listen on ``ipc://`` sockets inside a run directory that is removed on exit, so a
stopped cluster leaves no process and no socket file behind. With ``link`` (``--link``), each
worker runs in a network namespace of its own behind a ``tc``-shaped veth pair and listens on
``tcp://`` (``appliance.netlinks``); where that cannot be had, the transport emulates the
rate instead, and ``LocalCluster.link_note`` says which.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from appliance.config import ClusterConfig, dump_toml, parse_config
from appliance.netlinks import (
    WORKER_CONTROL_PORT,
    WORKER_DATA_PORT,
    LinkError,
    LinkSpec,
    ShapedNetwork,
    unavailable_reason,
)
from appliance.wire import messages as msg
from appliance.wire.transport import ControlClient
from engines.errors import ArmdiError

log = logging.getLogger("armdi.cluster")

# Loopback links as the allocator sees them: ~2.5 GB/s, ~0.1 ms per hop (measured with pynng).
LOOPBACK_MBPS = 20_000.0
LOOPBACK_LATENCY_MS = 0.1


@dataclass(frozen=True)
class LocalClusterOptions:
    model: str
    repo: Path
    nodes: int = 3
    mode: str = "edgepipe"
    ddi_input: str = "pixels"  # mode ddi: pixels | jpeg
    chain_workers: int = 2  # mode hybrid: workers per chain
    slowdown: tuple[float, ...] = ()
    max_blocks: tuple[int | None, ...] = ()  # per worker: its memory cap (None: none)
    cpus: tuple[tuple[int, ...] | None, ...] = ()
    threads: int = 1
    wire_dtype: str = "float32"
    key_hex: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    run_dir: Path | None = None
    request_timeout_s: float = 10.0
    queue_depth: int = 8
    source_runs_blocks: bool = True
    min_workers: int = 0  # the first N workers run at least one block each
    supervise: bool = False  # restart a worker that dies, with back-off (armdi up)
    emulate_compute: bool = False  # benches: wait the profiled time instead of computing
    emulate_scale: float = 1.0
    emulate_times: Path | None = None  # ...measured segment times instead, where it lists them
    link_mbps: float | None = None  # emulate every node's outgoing link at this rate
    hysteresis: float | None = None  # mode armdi's (None: the config's default)
    log_level: str = "WARNING"  # of the worker processes
    # Links: ipc:// sockets in the run dir; tcp:// on loopback; tls: tls+tcp:// on loopback,
    # mutual TLS with keys made by armdi keys init into the run dir.
    transport: str = "ipc"
    # Every node's outgoing link at this rate (and data frames this much later): tc-shaped
    # veth pairs between network namespaces where root is available ("auto", "tc"), else
    # (or with "transport") the transport's own rate limit, as link_mbps does.
    link: LinkSpec | None = None
    link_shaping: str = "auto"  # auto | tc (fail without it) | transport


def parse_list(text: str | None) -> list[str]:
    return [part.strip() for part in text.split(",")] if text else []


def parse_slowdown(text: str | None, nodes: int) -> tuple[float, ...]:
    """``"1,2,4"`` -> per worker slowdown factors (missing ones are 1)."""
    values = []
    for part in parse_list(text):
        try:
            value = float(part)
        except ValueError as exc:
            raise ArmdiError(f"--slowdown: {part!r} is not a number") from exc
        if value < 1.0:
            raise ArmdiError(f"--slowdown: {value} is below 1 (a node cannot be sped up)")
        values.append(value)
    if len(values) > nodes:
        raise ArmdiError(f"--slowdown gives {len(values)} factors for {nodes} nodes")
    return tuple(values + [1.0] * (nodes - len(values)))


def parse_max_blocks(text: str | None, nodes: int) -> tuple[int | None, ...]:
    """``"6"`` (every worker) or ``"6,6,12"`` -> per worker memory caps in blocks."""
    values = []
    for part in parse_list(text):
        try:
            value = int(part)
        except ValueError as exc:
            raise ArmdiError(f"--max-blocks: {part!r} is not a whole number") from exc
        if value < 1:
            raise ArmdiError(f"--max-blocks: {value} is below 1 (a worker that can hold no "
                             "block serves nothing)")
        values.append(value)
    if len(values) == 1:
        return tuple(values * nodes)
    if len(values) > nodes:
        raise ArmdiError(f"--max-blocks gives {len(values)} caps for {nodes} nodes")
    return tuple(values + [None] * (nodes - len(values)))


def parse_cpus(text: str | None, nodes: int) -> tuple[tuple[int, ...] | None, ...]:
    """``"0,1,1"`` or ``"0+1,2"`` -> CPUs per worker (``+`` joins several CPUs for one)."""
    out: list[tuple[int, ...] | None] = []
    count = os.cpu_count() or 1
    for part in parse_list(text):
        try:
            cpus = tuple(int(c) for c in part.split("+"))
        except ValueError as exc:
            raise ArmdiError(f"--cpus: {part!r} is not a CPU number list") from exc
        if any(not 0 <= c < count for c in cpus):
            raise ArmdiError(f"--cpus: {part!r} names a CPU this machine lacks (0..{count - 1})")
        out.append(cpus)
    if len(out) > nodes:
        raise ArmdiError(f"--cpus gives {len(out)} entries for {nodes} nodes")
    return tuple(out + [None] * (nodes - len(out)))


def free_tcp_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct TCP ports nobody listens on now (all held open while they are
    picked; another process may still take one before it is used: for local clusters)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(sock)
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def free_tcp_port(host: str = "127.0.0.1") -> int:
    return free_tcp_ports(1, host)[0]


def _addresses(options: LocalClusterOptions, run_dir: Path, name: str,
               ports: Iterator[int], network: ShapedNetwork | None = None) -> dict[str, str]:
    if network is not None:
        # Workers own their namespace's ports; the source picks free ones on its address.
        ip = network.ip(name)
        scheme = "tls+tcp" if options.transport == "tls" else "tcp"
        data, control = ((WORKER_DATA_PORT, WORKER_CONTROL_PORT) if name in network.workers
                         else (next(ports), next(ports)))
        out = {"data_addr": f"{scheme}://{ip}:{data}", "control_addr": f"{scheme}://{ip}:{control}"}
        if options.transport == "tls":
            out["tls_cert"] = str(run_dir / "keys" / "nodes" / f"{name}.pem")
        return out
    if options.transport == "ipc":
        return {"data_addr": f"ipc://{run_dir}/{name}.data",
                "control_addr": f"ipc://{run_dir}/{name}.ctl"}
    if options.transport == "tcp":
        return {"data_addr": f"tcp://127.0.0.1:{next(ports)}",
                "control_addr": f"tcp://127.0.0.1:{next(ports)}"}
    if options.transport != "tls":
        raise ArmdiError(f"transport {options.transport!r}: use ipc, tcp or tls")
    return {"data_addr": f"tls+tcp://127.0.0.1:{next(ports)}",
            "control_addr": f"tls+tcp://127.0.0.1:{next(ports)}",
            "tls_cert": str(run_dir / "keys" / "nodes" / f"{name}.pem")}


def local_config(options: LocalClusterOptions, run_dir: Path,
                 network: ShapedNetwork | None = None) -> ClusterConfig:
    """The cluster.toml of a local cluster, as a validated config. With
    ``transport="tls"``, ``armdi keys init`` is run into ``run_dir/keys`` first and every
    link is mutual TLS. With ``network`` (up), nodes listen on its addresses."""
    names = ["source"] + [f"w{i + 1}" for i in range(options.nodes)]
    tls = options.transport == "tls"
    if tls and not (run_dir / "keys" / "ca.crt").exists():
        from appliance.keys import init_keys

        init_keys(run_dir / "keys", names)
    if network is not None:
        ports = iter(free_tcp_ports(2, network.ip("source")))
    else:
        ports = iter(free_tcp_ports(2 * len(names)) if options.transport != "ipc" else [])
    link = options.link
    rate_mbps = options.link_mbps or (link.mbps if link else None) or LOOPBACK_MBPS
    latency_ms = LOOPBACK_LATENCY_MS + (link.delay_ms if link else 0.0)
    workers = []
    for i in range(options.nodes):
        name = f"w{i + 1}"
        worker: dict[str, object] = {
            "name": name,
            **_addresses(options, run_dir, name, ports, network),
            "slowdown": options.slowdown[i] if i < len(options.slowdown) else 1.0,
            "max_blocks": options.max_blocks[i] if i < len(options.max_blocks) else None,
            "threads": options.threads,
            "bandwidth_mbps": rate_mbps,
            "latency_ms": latency_ms,
        }
        cpus = options.cpus[i] if i < len(options.cpus) else None
        if cpus:
            worker["cpus"] = list(cpus)
        workers.append(worker)
    cluster: dict[str, object] = {
        "model": options.model, "repo": str(options.repo), "mode": options.mode,
        "ddi_input": options.ddi_input, "chain_workers": options.chain_workers,
        "wire_dtype": options.wire_dtype, "request_timeout_s": options.request_timeout_s,
        "queue_depth": options.queue_depth,
        "min_workers": options.min_workers if options.mode != "local" else 0,
        "emulate_compute": options.emulate_compute, "emulate_scale": options.emulate_scale,
        "emulate_links": options.link_mbps is not None,
        "link_delay_ms": link.delay_ms if link else 0.0,
    }
    if options.hysteresis is not None:
        cluster["hysteresis"] = options.hysteresis
    if options.emulate_times is not None:
        cluster["emulate_times"] = str(options.emulate_times)
    if options.key_hex:
        cluster["key"] = options.key_hex
    if tls:
        cluster["tls_ca"] = str(run_dir / "keys" / "ca.crt")
    data = {
        "cluster": cluster,
        "source": {
            "name": "source",
            **_addresses(options, run_dir, "source", ports, network),
            "run_blocks": options.source_runs_blocks or options.mode == "local",
            "http_host": options.host,
            "http_port": options.port,
            "bandwidth_mbps": rate_mbps,
            "latency_ms": latency_ms,
        },
        "workers": workers if options.mode != "local" else [],
    }
    return parse_config(data, origin="armdi up", base_dir=run_dir)


def shape_links(options: LocalClusterOptions) -> tuple[ShapedNetwork | None, str]:
    """Bring up the shaped network of ``options.link``, or say why the transport emulates it
    instead: (the network or None, a line for the user)."""
    link = options.link
    if link is None:
        return None, "links: not shaped"
    if options.link_mbps is not None:
        raise ArmdiError("give links either as link (shaped) or as link_mbps (emulated in "
                         "the transport), not both")
    if options.link_shaping not in ("auto", "tc", "transport"):
        raise ArmdiError(f"link shaping {options.link_shaping!r}: use auto, tc or transport")
    delay = (f"; the {link.delay_ms:g} ms delay is added to data frames by the transport"
             if link.delay_ms else "")
    if options.mode == "local" or options.nodes == 0:
        return None, "links: none to shape (no workers)"
    reason = ("asked for (--link-shaping transport)" if options.link_shaping == "transport"
              else unavailable_reason())
    if reason is None:
        network = ShapedNetwork(link, [f"w{i + 1}" for i in range(options.nodes)])
        try:
            network.up()
        except LinkError as exc:
            reason = f"network namespaces failed: {exc}"
        else:
            return network, (f"links: {link.mbps:g} Mbit/s per node, shaped with tc tbf on "
                             f"veth pairs, each worker in its own network namespace "
                             f"({network.namespace('w1')}, ...){delay}")
    if options.link_shaping == "tc":
        raise ArmdiError(f"--link: cannot shape links with tc here: {reason}")
    return None, (f"links: {link.mbps:g} Mbit/s per node EMULATED INSIDE THE TRANSPORT "
                  f"(sends take size / rate), not shaped with tc: {reason}{delay}")


class LocalCluster:
    """Starts the worker processes of a config; ``stop`` ends them and removes the run dir
    (and the shaped network, where there is one)."""

    def __init__(self, options: LocalClusterOptions):
        self.own_run_dir = options.run_dir is None
        self.run_dir = Path(options.run_dir or tempfile.mkdtemp(prefix="armdi-"))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.network: ShapedNetwork | None = None
        try:
            self.network, self.link_note = shape_links(options)
            if options.link is not None and self.network is None and options.nodes > 0:
                options = replace(options, link_mbps=options.link.mbps)
            self.options = options
            self.config = local_config(options, self.run_dir, self.network)
        except BaseException:
            if self.network is not None:
                self.network.down()
            if self.own_run_dir:
                shutil.rmtree(self.run_dir, ignore_errors=True)
            raise
        self.config_path = self.run_dir / "cluster.toml"
        self.config_path.write_text(dump_toml(self.config))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.extra: list[subprocess.Popen[bytes]] = []  # workers started by join()
        self.restarts = 0
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None

    def _spawn(self, name: str, *args: str, **popen: Any) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, "-m", "appliance.cli", "--log-level", self.options.log_level,
               "node", "--config", str(self.config_path), "--name", name,
               "--parent-pid", str(os.getpid()), *args]
        if self.network is not None:
            cmd = self.network.wrap(name, cmd)
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, **popen)

    def join(self, name: str, via: str, **popen: Any) -> subprocess.Popen[bytes]:
        """Start the config's worker ``name`` (not started yet) with ``--join via``: it joins
        the running chain through that member. The caller waits for it and ends it."""
        proc = self._spawn(name, "--join", via, **popen)
        self.extra.append(proc)
        return proc

    def supervise(self) -> None:
        """Restart a worker that exits, as systemd does on a Jetson: after 1 s, doubling up
        to 30 s while it keeps dying, back to 1 s once it has run for a minute. Recovery
        does not wait for this: the source routes around the dead worker at once."""
        def loop() -> None:
            backoff = {w.name: 1.0 for w in self.config.workers}
            started = {w.name: time.monotonic() for w in self.config.workers}
            due: dict[str, float] = {}
            while not self._stopping.wait(0.25):
                now = time.monotonic()
                for i, (worker, proc) in enumerate(zip(self.config.workers, self.procs,
                                                       strict=False)):
                    name = worker.name
                    if proc.poll() is None:
                        if now - started[name] > 60:
                            backoff[name] = 1.0
                        continue
                    if name not in due:
                        due[name] = now + backoff[name]
                        log.warning("worker %s exited (status %s); restarting in %.0f s", name,
                                    proc.returncode, backoff[name])
                    elif now >= due[name]:
                        del due[name]
                        self.procs[i] = self._spawn(name)
                        started[name] = now
                        backoff[name] = min(30.0, backoff[name] * 2)
                        self.restarts += 1

        self._supervisor = threading.Thread(target=loop, name="supervisor", daemon=True)
        self._supervisor.start()

    def start_workers(self, timeout_s: float = 60.0, count: int | None = None) -> None:
        """Start every worker (the first ``count``) and wait until each answers on its
        control socket; a worker that exits first fails the start at once, with its status."""
        workers = self.config.workers[:count]
        for worker in workers:
            self.procs.append(self._spawn(worker.name))
        key = self.config.cluster.hmac_key()
        tls = self.config.tls_files(self.config.source.name)
        waiting = dict(zip(workers, self.procs, strict=True))
        deadline = time.monotonic() + timeout_s
        while waiting:
            for worker, proc in list(waiting.items()):
                if proc.poll() is not None:
                    raise ArmdiError(f"worker {worker.name} exited at start (status "
                                     f"{proc.returncode}); see its error above")
                try:
                    with ControlClient(worker.control_addr, key=key, tls=tls) as client:
                        client.request(msg.StatusRequest(), timeout_ms=200)
                except ArmdiError:
                    continue
                del waiting[worker]
            if waiting and time.monotonic() > deadline:
                names = ", ".join(w.name for w in waiting)
                raise ArmdiError(f"workers {names} did not start within {timeout_s:.0f} s")

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM every worker, SIGKILL those still alive after ``timeout``, remove the
        sockets. A second Ctrl-C during this does not interrupt the cleanup."""
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            self._stop(timeout)
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    def _stop(self, timeout: float) -> None:
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join(timeout=5)
        procs = self.procs + self.extra
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
        self.extra.clear()
        if self.network is not None:
            self.network.down()
            self.network = None
        if self.own_run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        else:
            for path in self.run_dir.glob("*.data"):
                path.unlink(missing_ok=True)
            for path in self.run_dir.glob("*.ctl"):
                path.unlink(missing_ok=True)


@contextlib.contextmanager
def running(options: LocalClusterOptions) -> Iterator[tuple[LocalCluster, ClusterConfig]]:
    cluster = LocalCluster(options)
    try:
        cluster.start_workers()
        if options.supervise:
            cluster.supervise()
        yield cluster, cluster.config
    finally:
        cluster.stop()
