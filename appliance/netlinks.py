"""Shaped links on one machine (``--link RATE[,DELAY]``).

Each worker of a local cluster runs in a network namespace of its own
(``armdi-<pid>-<n>-w1``, ...; ``n`` numbers the clusters of one process). The namespaces hang
off a bridge in a hub namespace (``armdi-<pid>-<n>-hub``), and the source, which stays in the
namespace it was started in, reaches the hub through one more veth pair (``armdi<pid>-<n>``
on its side)::

    source (here) --armdi<pid>-<n> / source-- [hub: br0] --wN / eth0-- worker wN (own netns)

Every node's *outgoing* link is shaped with ``tc qdisc ... tbf`` on its own end of its veth
pair: the source's on ``armdi<pid>``, a worker's on its ``eth0``. That is the link the
transport's own emulation (``[cluster] emulate_links``) models, so both give the same picture.
This kernel family often lacks ``netem``, so a delay is not a qdisc: it is added by the
transport to data frames (``[cluster] link_delay_ms``) in both cases.

Needs root (``ip netns``, ``ip link``, ``tc`` from iproute2). Where it cannot be had, the
caller falls back to the transport's rate limit and says so (see ``appliance.cluster``).
Everything is removed by ``ShapedNetwork.down``; what a crashed run left behind (names with
the pid of a process that is gone) is removed by ``remove_stale`` at the next start.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from engines.errors import ArmdiError

log = logging.getLogger("armdi.netlinks")

PREFIX = "armdi"
_NS_RE = re.compile(rf"^{PREFIX}-(\d+)-(\d+)-([A-Za-z0-9_.-]+)$")
_LINK_RE = re.compile(rf"^{PREFIX}(\d+)-(\d+)$")
_RATE_UNITS = {"bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
_DELAY_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}
WORKER_DATA_PORT = 7101
WORKER_CONTROL_PORT = 7102


class LinkError(ArmdiError):
    """Shaped links could not be set up here (no root, no netns, ...)."""


@dataclass(frozen=True)
class LinkSpec:
    """One emulated link: ``rate_bps`` bits per second and a one-way delay."""

    rate_bps: float
    delay_ms: float = 0.0

    @property
    def mbps(self) -> float:
        return self.rate_bps / 1e6

    @property
    def bytes_per_s(self) -> float:
        return self.rate_bps / 8

    def __str__(self) -> str:
        rate = f"{self.mbps:g}mbit"
        return f"{rate},{self.delay_ms:g}ms" if self.delay_ms else rate


def parse_link(text: str) -> LinkSpec:
    """``"20mbit"``, ``"100mbit,5ms"``, ``"1gbit,200us"`` -> a ``LinkSpec``.

    Rates in bit, kbit, mbit or gbit (bits per second, as ``tc`` spells them); delays in us,
    ms or s. Anything else is refused with the reason.
    """
    parts = [p.strip() for p in text.strip().lower().split(",")]
    if not parts[0] or len(parts) > 2:
        raise ArmdiError(f"--link {text!r}: give RATE[,DELAY], e.g. 20mbit or 100mbit,5ms")
    rate = _number_with_unit(parts[0], _RATE_UNITS, text, "rate")
    if rate <= 0:
        raise ArmdiError(f"--link {text!r}: the rate must be above 0")
    if rate < 8e3:
        raise ArmdiError(f"--link {text!r}: {rate:g} bit/s is below 8kbit, too slow for a "
                         f"frame to cross in time")
    delay = 0.0
    if len(parts) == 2:
        delay = _number_with_unit(parts[1], _DELAY_UNITS, text, "delay")
        if not 0 <= delay <= 10_000:
            raise ArmdiError(f"--link {text!r}: the delay must be between 0 and 10s")
    return LinkSpec(rate_bps=rate, delay_ms=delay)


def _number_with_unit(part: str, units: dict[str, float], text: str, what: str) -> float:
    match = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]+)", part)
    if match is None or match.group(2) not in units:
        if part.endswith("bps"):
            raise ArmdiError(f"--link {text!r}: write bit rates as kbit, mbit or gbit (tc reads "
                             f"'mbps' as megabytes per second)")
        raise ArmdiError(f"--link {text!r}: the {what} {part!r} needs a unit: "
                         f"{', '.join(units)}")
    return float(match.group(1)) * units[match.group(2)]


# ---------------------------------------------------------------------------- commands
Runner = Callable[[Sequence[str]], str]


def run_command(cmd: Sequence[str]) -> str:
    """Run ``cmd``; its stdout, or ``LinkError`` with its stderr."""
    try:
        done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=30,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LinkError(f"{' '.join(cmd)}: {exc}") from exc
    if done.returncode != 0:
        raise LinkError(f"{' '.join(cmd)}: {done.stderr.strip() or f'status {done.returncode}'}")
    return done.stdout


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def namespaces(run: Runner = run_command) -> list[str]:
    """The names of this machine's network namespaces (``ip netns list``)."""
    return [line.split()[0] for line in run(["ip", "netns", "list"]).splitlines()
            if line.strip()]


def root_links(run: Runner = run_command) -> list[str]:
    """The interface names in this namespace (``ip -o link``), without ``@peer``."""
    names = []
    for line in run(["ip", "-o", "link", "show"]).splitlines():
        fields = line.split(":", 2)
        if len(fields) >= 2:
            names.append(fields[1].strip().split("@")[0])
    return names


def stale_names(ns_names: Sequence[str], link_names: Sequence[str],
                alive: Callable[[int], bool] = _alive) -> tuple[list[str], list[str]]:
    """Which namespaces and links a run whose process is gone left behind (by their names:
    ``armdi-<pid>-<n>-<node>`` and ``armdi<pid>-<n>``). Pure: the unit under test."""
    ns = [n for n in ns_names if (m := _NS_RE.match(n)) and not alive(int(m.group(1)))]
    links = [n for n in link_names if (m := _LINK_RE.match(n)) and not alive(int(m.group(1)))]
    # The hub last: worker veths go with their namespaces, the root veth with the hub.
    ns.sort(key=lambda n: n.endswith("-hub"))
    return ns, links


def remove_namespace(name: str, run: Runner = run_command) -> None:
    """Kill the processes still inside namespace ``name`` (SIGTERM, then SIGKILL) and
    delete it; its veth ends go with it."""
    with contextlib.suppress(LinkError):
        pids = [int(p) for p in run(["ip", "netns", "pids", name]).split()]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + 3.0
            while any(_alive(p) for p in pids) and time.monotonic() < deadline:
                time.sleep(0.05)
            pids = [p for p in pids if _alive(p)]
            if not pids:
                break
    run(["ip", "netns", "delete", name])


def remove_stale(run: Runner = run_command) -> list[str]:
    """Remove what crashed runs left (see ``stale_names``); returns the names removed."""
    ns, links = stale_names(namespaces(run), root_links(run))
    removed = []
    for name in ns:
        try:
            remove_namespace(name, run)
            removed.append(name)
        except LinkError as exc:
            log.warning("could not remove stale namespace %s: %s", name, exc)
    for name in links:
        if name in root_links(run):  # usually gone with the hub
            try:
                run(["ip", "link", "delete", name])
                removed.append(name)
            except LinkError as exc:
                log.warning("could not remove stale link %s: %s", name, exc)
    if removed:
        log.warning("removed what an earlier run left: %s", ", ".join(removed))
    return removed


def unavailable_reason() -> str | None:
    """Why shaped links cannot be made here, or None when they can be tried."""
    if os.geteuid() != 0:
        return "not root (network namespaces need root)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"no {tool!r} command (install iproute2)"
    return None


GSO_BYTES = 16 * 1024
"""The largest segment the kernel hands a shaped veth (``gso_max_size``): a bucket must hold
one, and whatever the bucket holds leaves at once, ahead of the rate. 64 KiB (the default)
made a 150 KB message on an idle 20 Mbit/s link arrive in 37 ms instead of 60; 16 KiB, 56 ms,
at the same throughput. Smaller segments (MTU-sized) lost a third of the rate at 100 Mbit/s
and more at 1 Gbit/s on a 2-core machine."""


def tbf_command(dev: str, link: LinkSpec, segment: int = GSO_BYTES) -> list[str]:
    """``tc qdisc add dev DEV root tbf ...`` for ``link``'s rate: a bucket of 4 ms of
    traffic, at least one ``segment`` (plus headers), and at most 50 ms queued."""
    burst = max(segment + 2048, int(link.bytes_per_s * 0.004))
    return ["tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{int(link.rate_bps)}bit",
            "burst", str(burst), "latency", "50ms"]


def pick_subnet(pid: int, taken: Sequence[str]) -> ipaddress.IPv4Network:
    """A /24 in 10.200.0.0/13 that no address here falls in (``taken``: CIDR strings)."""
    used = [ipaddress.ip_interface(t).network for t in taken]
    for i in range(2048):
        index = (pid + i) % 2048
        net = ipaddress.IPv4Network(f"10.{200 + index // 256}.{index % 256}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise LinkError("no free /24 left in 10.200.0.0/13 for the shaped links")


def _addresses_here(run: Runner) -> list[str]:
    out = run(["ip", "-o", "-4", "addr", "show"])
    return [f.split()[0] for line in out.splitlines()
            for f in [line.split(" inet ", 1)[-1]] if " inet " in line]


class ShapedNetwork:
    """The namespaces, bridge and veth pairs of one local cluster (see the module doc)."""

    def __init__(self, link: LinkSpec, workers: Sequence[str], *, pid: int | None = None,
                 run: Runner = run_command) -> None:
        self.link = link
        self.workers = list(workers)
        self.pid = os.getpid() if pid is None else pid
        self._run = run
        self.number = 0  # which of this process's clusters (set by ``up``)
        self._made: list[str] = []  # namespaces created, in order
        self._subnet: ipaddress.IPv4Network | None = None

    @property
    def hub(self) -> str:
        return self.namespace("hub")

    @property
    def source_dev(self) -> str:
        return f"{PREFIX}{self.pid}-{self.number}"

    def namespace(self, node: str) -> str:
        return f"{PREFIX}-{self.pid}-{self.number}-{node}"

    @property
    def subnet(self) -> ipaddress.IPv4Network:
        if self._subnet is None:
            raise LinkError("the shaped network is not up")
        return self._subnet

    def ip(self, node: str) -> str:
        """The address of ``node`` ("source" or a worker name) on the shaped network."""
        hosts = list(self.subnet.hosts())
        return str(hosts[0] if node not in self.workers else hosts[1 + self.workers.index(node)])

    def wrap(self, worker: str, cmd: Sequence[str]) -> list[str]:
        """``cmd`` run inside ``worker``'s namespace (``ip netns exec`` execs it: same pid)."""
        return ["ip", "netns", "exec", self.namespace(worker), *cmd]

    def up(self) -> None:
        """Create everything; on any failure remove what was made and raise ``LinkError``."""
        if len(self.workers) > 250:
            raise LinkError("shaped links: at most 250 workers")
        try:
            self._up()
        except BaseException:
            self.down()
            raise

    def _up(self) -> None:
        run = self._run
        remove_stale(run)
        present = set(namespaces(run))
        free = [n for n in range(100) if f"{PREFIX}-{self.pid}-{n}-hub" not in present]
        if not free:
            raise LinkError("this process already runs 100 shaped networks")
        self.number = free[0]
        self._subnet = pick_subnet(self.pid, _addresses_here(run))
        prefix = self.subnet.prefixlen
        self._add_namespace(self.hub)
        run(["ip", "-n", self.hub, "link", "add", "br0", "type", "bridge"])
        run(["ip", "-n", self.hub, "link", "set", "br0", "up"])
        run(["ip", "link", "add", self.source_dev, "type", "veth", "peer", "name", "source",
             "netns", self.hub])
        run(["ip", "-n", self.hub, "link", "set", "dev", "source", "master", "br0", "up"])
        run(["ip", "addr", "add", f"{self.ip('source')}/{prefix}", "dev", self.source_dev])
        run(["ip", "link", "set", self.source_dev, "up"])
        self._shape([], self.source_dev)
        for worker in self.workers:
            ns = self.namespace(worker)
            self._add_namespace(ns)
            run(["ip", "-n", self.hub, "link", "add", worker, "type", "veth", "peer", "name",
                 "eth0", "netns", ns])
            run(["ip", "-n", self.hub, "link", "set", "dev", worker, "master", "br0", "up"])
            run(["ip", "-n", ns, "link", "set", "lo", "up"])
            run(["ip", "-n", ns, "addr", "add", f"{self.ip(worker)}/{prefix}", "dev", "eth0"])
            run(["ip", "-n", ns, "link", "set", "eth0", "up"])
            self._shape(["ip", "netns", "exec", ns], "eth0")

    def _shape(self, inside: list[str], dev: str) -> None:
        """tbf on ``dev`` (run through ``inside``), with its segments cut to ``GSO_BYTES``
        where the kernel lets us, else with a bucket that holds a 64 KiB segment."""
        try:
            self._run([*inside, "ip", "link", "set", "dev", dev, "gso_max_size",
                       str(GSO_BYTES)])
            segment = GSO_BYTES
        except LinkError as exc:
            log.info("%s: segments stay 64 KiB (%s)", dev, exc)
            segment = 64 * 1024
        self._run([*inside, *tbf_command(dev, self.link, segment)])

    def _add_namespace(self, name: str) -> None:
        self._run(["ip", "netns", "add", name])
        self._made.append(name)

    def down(self) -> None:
        """Remove every namespace made (killing what still runs inside) and the source's
        veth; safe to call twice and after a partial ``up``. Errors are logged, not raised:
        this runs while a cluster stops."""
        for name in sorted(self._made, key=lambda n: n == self.hub):
            try:
                remove_namespace(name, self._run)
            except LinkError as exc:
                log.warning("could not remove namespace %s: %s", name, exc)
        self._made.clear()
        with contextlib.suppress(LinkError):
            if self.source_dev in root_links(self._run):
                self._run(["ip", "link", "delete", self.source_dev])
