"""What the user is told about the allocation: idle workers with a reason, ranges from the start.

Nothing here depends on this machine's timings: a worker slowed a million times never pays
(the optimum leaves it out on any machine, and it is never sent a request), and
``min_workers`` forces workers in whatever the optimum would say.
"""

from __future__ import annotations

from pathlib import Path

from appliance.cli import _idle_lines
from tests.conftest import BuiltModel
from tests.system.conftest import cluster

NEVER_PAYS = (1e6, 1e6)


def test_idle_workers_are_reported_with_the_reason(built_tiny: BuiltModel,
                                                   tmp_path: Path) -> None:
    with cluster(built_tiny.repo, "tiny", tmp_path, nodes=2, slowdown=NEVER_PAYS) as source:
        status = source.status()
        result = source.submit(built_tiny_input(built_tiny)).result(timeout=30)
        lines = _idle_lines(source)
    workers = [n for n in status.nodes if n.role == "worker"]
    assert [(n.name, n.start, n.end, n.state) for n in workers] == [
        ("w1", 0, 0, "idle"), ("w2", 0, 0, "idle")]
    for n in workers:
        assert "the optimum leaves it out" in n.reason and "--min-workers" in n.reason
    assert [h.node for h in result.path] == ["source"]
    assert len(lines) == 2 and lines[0].startswith("  w1 runs no blocks: the optimum leaves")


def test_min_workers_forces_them_in_and_ranges_show_before_the_first_poll(
        built_tiny: BuiltModel, tmp_path: Path) -> None:
    blocks = built_tiny.manifest.blocks
    with cluster(built_tiny.repo, "tiny", tmp_path, nodes=2, min_workers=2) as source:
        status = source.status()  # at once: the poll loop has not asked the workers yet
        assert all(w.last is None for w in source.workers)
        result = source.submit(built_tiny_input(built_tiny)).result(timeout=30)
    b = source.allocation.boundaries if source.allocation else ()
    workers = {n.name: n for n in status.nodes if n.role == "worker"}
    assert (workers["w1"].start, workers["w1"].end) == (b[1], b[2])
    assert (workers["w2"].start, workers["w2"].end) == (b[2], b[3]) and b[3] == blocks
    assert all(n.start < n.end and n.state == "up" and n.reason == "" for n in workers.values())
    assert all(n.stage_ms is not None and n.stage_ms > 0 for n in workers.values())
    assert [h.node for h in result.path][-2:] == ["w1", "w2"]


def built_tiny_input(built: BuiltModel):  # type: ignore[no-untyped-def]
    import numpy as np

    shape = (1, *built.manifest.input.shape[1:])
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)
