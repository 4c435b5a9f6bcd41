"""The TensorRT build plan: segment weights from the shared weights file, stripped and full
plan sizes, the most-likely-first order, the prebuild budget and the refusals, and
``armdi build --backend trt --plan [--json]`` on a machine without TensorRT."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import onnx
import pytest
from typer.testing import CliRunner

from builder.segments import WEIGHTS_FILE, segment_ranges
from builder.trt_plan import (
    PLAN_BYTES_PER_ENGINE,
    PLAN_BYTES_PER_NODE,
    BlockStats,
    ModelStats,
    balanced_boundaries,
    likely_order,
    make_plan,
    plan_bytes,
    plan_kind,
    segment_distance,
    stats_from_model_dir,
    stats_from_onnx,
)
from tests.conftest import BuiltModel

GB = 10**9


def toy_stats(weights: list[int], shared: dict[int, int] | None = None) -> ModelStats:
    """Blocks holding one weight each (offset k, length weights[k]), 2 nodes, 100-byte graphs;
    ``shared`` maps a block to another block whose weight it also reads."""
    blocks = []
    for k, length in enumerate(weights):
        refs = {(k, length)}
        if shared and k in shared:
            other = shared[k]
            refs.add((other, weights[other]))
        blocks.append(BlockStats(frozenset(refs), 0, 2, 100, 40))
    return ModelStats("toy", tuple(blocks), sum(weights), 500)


def test_segment_weights_count_a_shared_weight_once() -> None:
    stats = toy_stats([10, 20, 30], shared={2: 0})  # block 2 reads block 0's weight too
    assert stats.segment_weights(0, 1) == 10
    assert stats.segment_weights(1, 3) == 20 + 30 + 10
    assert stats.segment_weights(0, 3) == 60  # block 0's weight once
    assert stats.segment_graph(0, 3) == 40 + 3 * 60  # one frame, every block's body


def test_plan_sizes_stripped_and_full() -> None:
    stats = toy_stats([1000, 2000])
    network = PLAN_BYTES_PER_ENGINE + 2 * 2 * PLAN_BYTES_PER_NODE
    assert plan_bytes(stats, 0, 2, stripped=True) == network
    assert plan_bytes(stats, 0, 2, stripped=False) == network + 3000
    assert plan_bytes(stats, 0, 2, stripped=False, fp16=True) == network + 1500


def test_full_plans_copy_each_block_into_every_segment_that_holds_it() -> None:
    stats = toy_stats([1000] * 6)
    plan = make_plan(stats, segment_ranges(6, "all"), segments="all", kind=plan_kind(None),
                     fp16=False, free_disk_bytes=GB, prebuild_ratio=None)
    # block k is in (k + 1)(K - k) segments: 6 + 10 + 12 + 12 + 10 + 6 = 56 copies
    networks = plan.stripped_plans_bytes
    assert plan.engines == 21 and plan.full_plans_bytes - networks == 56 * 1000


def test_stats_of_a_built_model_match_its_files(built_tiny: BuiltModel) -> None:
    model_dir = built_tiny.model_dir
    blocks = built_tiny.manifest.blocks
    stats = stats_from_model_dir(model_dir, "tiny", blocks)
    assert stats.weights_bytes == (model_dir / WEIGHTS_FILE).stat().st_size
    full = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    lengths = sum(int({e.key: e.value for e in t.external_data}["length"])
                  for t in full.graph.initializer
                  if t.data_location == onnx.TensorProto.EXTERNAL)
    assert stats.segment_weights(0, blocks) >= lengths
    for start, end in ((0, 3), (2, blocks)):  # real files are used where they exist
        path = model_dir / f"seg_{start:04d}_{end:04d}.onnx"
        assert stats.segment_graph(start, end) == path.stat().st_size


def test_stats_of_an_onnx_file_equal_those_of_its_build(built_tiny: BuiltModel,
                                                       tmp_path: Path) -> None:
    built = stats_from_model_dir(built_tiny.model_dir, "tiny", built_tiny.manifest.blocks)
    fresh = stats_from_onnx(built_tiny.source, "tiny", tmp_path, "all")
    assert fresh.weights_bytes == built.weights_bytes
    assert [b.weights for b in fresh.blocks] == [b.weights for b in built.blocks]
    assert fresh.segment_graph_bytes == {r: n for r, n in built.segment_graph_bytes.items()
                                         if r[1] - r[0] > 1}
    assert not fresh.onnx_built


def test_balanced_boundaries_and_distance() -> None:
    assert balanced_boundaries([1.0] * 9, 3) == (0, 3, 6, 9)
    assert balanced_boundaries([5.0, 1, 1, 1, 1, 1], 2) == (0, 1, 6)
    assert balanced_boundaries([1.0, 1.0], 5) == (0, 1, 2)
    assert segment_distance(3, 6, (0, 3, 6, 9)) == 0
    assert segment_distance(2, 6, (0, 3, 6, 9)) == 1
    assert segment_distance(1, 8, (0, 3, 6, 9)) == 2


def test_likely_order_blocks_first_then_widening_around_the_optimum() -> None:
    order = likely_order(segment_ranges(9, "all"), (0, 3, 6, 9))
    assert order[:9] == [(k, k + 1) for k in range(9)]
    assert order[9:12] == [(0, 3), (3, 6), (6, 9)]  # the optimum's own ranges
    distances = [segment_distance(*r, (0, 3, 6, 9)) for r in order[9:]]
    assert distances == sorted(distances)  # widening outward


def test_prebuild_stays_within_the_ratio_but_keeps_every_block() -> None:
    stats = toy_stats([100_000] * 8)
    plan = make_plan(stats, segment_ranges(8, "all"), segments="all", kind=plan_kind("10.3.0"),
                     fp16=False, free_disk_bytes=GB, boundaries=(0, 4, 8))
    assert plan.stripped and plan.engines == 36
    prebuilt = plan.prebuild
    assert prebuilt[:8] == tuple((k, k + 1) for k in range(8))
    assert plan.prebuild_stripped.repository_bytes <= 1.5 * stats.onnx_model_bytes
    assert 8 < len(prebuilt) < 36 and prebuilt[8] in ((0, 4), (4, 8))
    # Full plans: the blocks alone copy the model once, so nothing fused is prebuilt.
    full = make_plan(stats, segment_ranges(8, "all"), segments="all", kind=plan_kind("8.6.1"),
                     fp16=False, free_disk_bytes=GB)
    assert not full.stripped and full.prebuild == tuple((k, k + 1) for k in range(8))
    assert any("cannot strip" in n for n in full.notes)
    everything = make_plan(stats, segment_ranges(8, "all"), segments="all",
                           kind=plan_kind("10.3.0"), fp16=False, free_disk_bytes=GB,
                           prebuild_ratio=None)
    assert len(everything.prebuild) == 36


def test_a_build_beyond_the_free_disk_or_max_disk_is_refused() -> None:
    stats = toy_stats([100_000] * 4)
    kind = plan_kind("8.6.1")
    ok = make_plan(stats, segment_ranges(4, "all"), segments="all", kind=kind, fp16=False,
                   free_disk_bytes=GB)
    assert ok.refused is None and ok.needed_bytes > 400_000
    tight = make_plan(stats, segment_ranges(4, "all"), segments="all", kind=kind, fp16=False,
                      free_disk_bytes=GB, max_disk_bytes=100_000)
    assert tight.refused and "--max-disk" in tight.refused and tight.prebuild == ()
    assert "REFUSED" in tight.render()
    full_disk = make_plan(stats, segment_ranges(4, "all"), segments="all", kind=kind,
                          fp16=False, free_disk_bytes=50_000)
    assert full_disk.refused and "free disk" in full_disk.refused


def test_engines_done_earlier_cost_nothing_more() -> None:
    stats = toy_stats([1000] * 4)
    fresh = make_plan(stats, segment_ranges(4, "blocks"), segments="blocks",
                      kind=plan_kind("10.3.0"), fp16=False, free_disk_bytes=GB,
                      seconds_per_engine=10.0)
    half = make_plan(stats, segment_ranges(4, "blocks"), segments="blocks",
                     kind=plan_kind("10.3.0"), fp16=False, free_disk_bytes=GB,
                     seconds_per_engine=10.0, done=[(0, 1), (1, 2)])
    assert (fresh.build_seconds, half.build_seconds) == (40.0, 20.0)
    assert half.needed_bytes == fresh.needed_bytes // 2
    assert half.seconds_source == "measured on this device"


# --- the command line --------------------------------------------------------------------


def _cli(*args: str) -> tuple[int, str]:
    from appliance.cli import app

    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def test_plan_of_a_built_model_as_json(built_tiny: BuiltModel) -> None:
    before = sorted(p.name for p in built_tiny.model_dir.iterdir())
    code, out = _cli("build", "tiny", "--backend", "trt", "--plan", "--json", "--repo",
                     str(built_tiny.repo))
    assert code == 0, out
    data = json.loads(out)
    blocks = built_tiny.manifest.blocks
    assert data["engines"] == blocks * (blocks + 1) // 2 and data["tensorrt"] is None
    assert data["all"]["full_plans_bytes"] > data["all"]["stripped_plans_bytes"] > 0
    # The tiny model's weights are small next to a plan's network: blocks only, the rest on
    # demand.
    assert data["prebuild_stripped"]["engines"] == blocks
    assert data["prebuild_stripped"]["first"][0] == [0, 1]
    assert "assumed" in data["seconds_source"] and data["free_disk_bytes"] > 0
    assert sorted(p.name for p in built_tiny.model_dir.iterdir()) == before  # built nothing


def test_plan_of_an_onnx_file_not_built_yet(tiny_onnx: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    code, out = _cli("build", str(tiny_onnx), "--backend", "trt", "--plan", "--segments",
                     "window:3", "--repo", str(repo))
    assert code == 0, out
    assert "TensorRT build plan for tiny" in out and "stripped plans" in out
    assert "full plans" in out and "free disk" in out and "TensorRT is not installed" in out
    assert not (repo / "tiny").exists()


def test_plan_refused_by_max_disk_exits_1(built_tiny: BuiltModel) -> None:
    code, out = _cli("build", "tiny", "--backend", "trt", "--plan", "--max-disk", "1K",
                     "--prebuild-ratio", "0", "--repo", str(built_tiny.repo))
    assert code == 1 and "REFUSED" in out and "--max-disk" in out


def test_plan_needs_the_trt_backend(built_tiny: BuiltModel) -> None:
    code, out = _cli("build", "tiny", "--plan", "--repo", str(built_tiny.repo))
    assert code == 1 and "--backend trt" in out


CLUSTER = """\
[cluster]
model = "tiny"

[source]
data_addr = "tcp://127.0.0.1:5600"
control_addr = "tcp://127.0.0.1:5601"
run_blocks = false

[[workers]]
name = "w1"
data_addr = "tcp://127.0.0.1:5610"
control_addr = "tcp://127.0.0.1:5611"

[[workers]]
name = "w2"
data_addr = "tcp://127.0.0.1:5620"
control_addr = "tcp://127.0.0.1:5621"
slowdown = {slowdown}
"""


@pytest.mark.parametrize("slowdown", [1.0, 8.0])
def test_plan_starts_around_the_configured_clusters_optimum(
    built_tiny: BuiltModel, tmp_path: Path, slowdown: float
) -> None:
    from appliance.config import load_config
    from appliance.control.allocator import snapshot_from_profile, solve
    from engines.device import device_signature

    config = tmp_path / "cluster.toml"
    config.write_text(CLUSTER.format(slowdown=slowdown))
    code, out = _cli("build", "tiny", "--backend", "trt", "--plan", "--json",
                     "--prebuild-ratio", "0", "--config", str(config),
                     "--repo", str(built_tiny.repo))
    assert code == 0, out
    prebuild = json.loads(out)["prebuild_stripped"]
    manifest = built_tiny.manifest
    profile = manifest.profile_for(device_signature(), "trt")
    assert profile is not None and load_config(config).workers[1].slowdown == slowdown
    optimum = solve(snapshot_from_profile([profile.block_ms] * 3, manifest.activation_bytes(),
                                          slowdown=[1.0, 1.0, slowdown],
                                          max_blocks=[0, None, None])).boundaries
    blocks = manifest.blocks
    assert prebuild["first"][0] == [0, 1]  # block engines first
    expected = likely_order(segment_ranges(blocks, "all"), optimum)[blocks:blocks + 6]
    assert [tuple(r) for r in prebuild["first_fused"]] == expected
    mine = {(a, b) for a, b in itertools.pairwise(optimum) if b - a > 1}
    assert mine <= set(expected[:len(mine)])  # the optimum's own ranges come first
