"""The --link parser and the cleanup logic of shaped links, as pure units (a recording fake
stands in for ``ip``/``tc``; the real thing is tested in tests/system/test_netlinks.py)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from appliance.netlinks import (
    GSO_BYTES,
    LinkError,
    LinkSpec,
    ShapedNetwork,
    parse_link,
    pick_subnet,
    stale_names,
    tbf_command,
)
from engines.errors import ArmdiError


@pytest.mark.parametrize(("text", "rate", "delay"), [
    ("20mbit", 20e6, 0.0),
    ("100mbit,5ms", 100e6, 5.0),
    (" 1gbit , 200us ", 1e9, 0.2),
    ("2.5Mbit,1s", 2.5e6, 1000.0),
    ("500kbit,0ms", 500e3, 0.0),
])
def test_parse_link(text: str, rate: float, delay: float) -> None:
    link = parse_link(text)
    assert link.rate_bps == pytest.approx(rate)
    assert link.delay_ms == pytest.approx(delay)
    assert parse_link(str(link)) == link


@pytest.mark.parametrize(("text", "says"), [
    ("", "RATE[,DELAY]"),
    ("20", "needs a unit"),
    ("20mbps", "mbit"),
    ("fast", "needs a unit"),
    ("0mbit", "above 0"),
    ("1kbit", "below 8kbit"),
    ("20mbit,5", "needs a unit"),
    ("20mbit,5ms,1", "RATE[,DELAY]"),
    ("20mbit,20s", "between 0 and 10s"),
])
def test_parse_link_refuses(text: str, says: str) -> None:
    with pytest.raises(ArmdiError, match=says.replace("[", r"\[").replace("]", r"\]")):
        parse_link(text)


def test_stale_names_only_of_gone_processes() -> None:
    alive = {100}.__contains__
    ns, links = stale_names(
        ["armdi-100-0-w1", "armdi-200-0-hub", "armdi-200-0-w1", "armdi-200-1-w2", "other",
         "armdi-x-0-w1"],
        ["lo", "eth0", "armdi100-0", "armdi200-0", "armdi200-1", "armdix"], alive)
    assert ns == ["armdi-200-0-w1", "armdi-200-1-w2", "armdi-200-0-hub"]  # hub last
    assert links == ["armdi200-0", "armdi200-1"]


def test_tbf_bucket_holds_a_segment_and_scales() -> None:
    slow = tbf_command("eth0", LinkSpec(20e6))
    fast = tbf_command("eth0", LinkSpec(1e9))
    assert slow[slow.index("rate") + 1] == "20000000bit"
    assert int(slow[slow.index("burst") + 1]) > GSO_BYTES
    assert int(tbf_command("eth0", LinkSpec(20e6), 65536)[slow.index("burst") + 1]) > 65536
    assert int(fast[fast.index("burst") + 1]) == 500_000


def test_pick_subnet_avoids_addresses_in_use() -> None:
    first = pick_subnet(0, [])
    assert str(first) == "10.200.0.0/24"
    assert str(pick_subnet(0, ["10.200.0.1/24"])) == "10.200.1.0/24"
    with pytest.raises(LinkError, match="no free"):
        pick_subnet(0, ["10.0.0.1/8"])


class FakeIp:
    """Records commands; fails the one that contains ``fail_on``; tracks namespaces."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.fail_on = fail_on
        self.calls: list[list[str]] = []
        self.ns: list[str] = []

    def __call__(self, cmd: Sequence[str]) -> str:
        cmd = list(cmd)
        self.calls.append(cmd)
        line = " ".join(cmd)
        if self.fail_on and self.fail_on in line:
            raise LinkError(f"{line}: refused")
        if cmd[:3] == ["ip", "netns", "list"]:
            return "".join(f"{n}\n" for n in self.ns)
        if cmd[:3] == ["ip", "netns", "add"]:
            self.ns.append(cmd[3])
        if cmd[:3] == ["ip", "netns", "delete"]:
            self.ns.remove(cmd[3])
        return ""


def test_up_then_down_removes_everything() -> None:
    ip = FakeIp()
    net = ShapedNetwork(LinkSpec(20e6, 5.0), ["w1", "w2"], pid=4242, run=ip)
    net.up()
    assert sorted(ip.ns) == ["armdi-4242-0-hub", "armdi-4242-0-w1", "armdi-4242-0-w2"]
    assert net.wrap("w2", ["python"]) == ["ip", "netns", "exec", "armdi-4242-0-w2", "python"]
    shaped = [c for c in ip.calls if "tbf" in c]
    assert len(shaped) == 3  # the source's and each worker's outgoing end
    assert net.ip("source") != net.ip("w1") != net.ip("w2")
    net.down()
    assert ip.ns == []
    net.down()  # twice is fine


def test_a_second_network_of_one_process_gets_its_own_names() -> None:
    ip = FakeIp()
    one = ShapedNetwork(LinkSpec(20e6), ["w1"], run=ip)  # this (live) process's pid
    two = ShapedNetwork(LinkSpec(20e6), ["w1"], run=ip)
    one.up()
    two.up()
    assert one.namespace("w1") != two.namespace("w1")
    assert one.source_dev != two.source_dev
    two.down()
    one.down()
    assert ip.ns == []


@pytest.mark.parametrize("step", ["type bridge", "netns armdi-4242-0-w2", "dev eth0 root tbf"])
def test_a_failed_up_removes_what_it_made(step: str) -> None:
    ip = FakeIp(fail_on=step)
    net = ShapedNetwork(LinkSpec(20e6), ["w1", "w2"], pid=4242, run=ip)
    with pytest.raises(LinkError, match="refused"):
        net.up()
    assert ip.ns == []


def test_up_removes_what_a_crashed_run_left() -> None:
    ip = FakeIp()
    ip.ns = ["armdi-999999999-0-hub", "armdi-999999999-0-w1", "unrelated"]
    ShapedNetwork(LinkSpec(20e6), ["w1"], pid=4242, run=ip).up()
    assert "armdi-999999999-0-w1" not in ip.ns and "armdi-999999999-0-hub" not in ip.ns
    assert "unrelated" in ip.ns


def test_without_tc_the_transport_emulates_the_link_and_says_so(tmp_path: Path) -> None:
    from appliance.cluster import LocalCluster, LocalClusterOptions

    cluster = LocalCluster(LocalClusterOptions(
        model="tiny", repo=tmp_path, nodes=2, run_dir=tmp_path / "run",
        link=parse_link("20mbit,5ms"), link_shaping="transport"))
    try:
        assert cluster.network is None
        assert "EMULATED INSIDE THE TRANSPORT" in cluster.link_note
        assert "5 ms delay" in cluster.link_note
        c = cluster.config
        assert c.cluster.emulate_links and c.cluster.link_delay_ms == 5.0
        assert {w.bandwidth_mbps for w in c.workers} == {20.0}
        assert all(w.data_addr.startswith("ipc://") for w in c.workers)
    finally:
        cluster.stop()


def test_link_shaping_tc_fails_clearly_where_it_cannot(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance import cluster as cluster_module

    monkeypatch.setattr(cluster_module, "unavailable_reason", lambda: "not root (test)")
    with pytest.raises(ArmdiError, match="cannot shape links with tc here: not root"):
        cluster_module.LocalCluster(cluster_module.LocalClusterOptions(
            model="tiny", repo=tmp_path, nodes=1, link=parse_link("20mbit"),
            link_shaping="tc"))
