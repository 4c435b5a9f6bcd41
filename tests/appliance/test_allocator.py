"""The allocator: hand-worked cases, validation, and an exhaustive cross-check on small chains."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.control.allocator import (
    BOTTLENECK_RTOL,
    Allocation,
    AllocationError,
    Snapshot,
    evaluate,
    even_split,
    scale,
    snapshot_from_profile,
    solve,
    stage_time,
    why_left_out,
)
from engines.errors import ArmdiError

# --- hand-worked examples ----------------------------------------------------------------


def test_two_equal_workers_split_in_the_middle() -> None:
    snap = snapshot_from_profile([[1.0] * 4] * 2, [0] * 5)
    alloc = solve(snap)
    assert alloc.boundaries == (0, 2, 4)
    assert alloc.stage_ms == (2.0, 2.0)
    assert alloc.bottleneck_ms == 2.0
    assert alloc.latency_ms == 4.0
    assert alloc.used == (0, 1)
    assert alloc.throughput_per_s == 500.0


def test_slow_worker_gets_fewer_blocks() -> None:
    snap = snapshot_from_profile([[1.0] * 8] * 2, [0] * 9, slowdown=[1.0, 3.0])
    alloc = solve(snap)
    assert alloc.boundaries == (0, 6, 8)  # 6 x 1 ms against 2 x 3 ms
    assert alloc.bottleneck_ms == 6.0


def test_huge_activation_is_never_cut() -> None:
    # shipping boundary 2 takes 1000 s; cutting at 1 or 3 costs nothing extra
    sizes = [0, 0, 10**9, 0, 0]
    snap = snapshot_from_profile([[1.0] * 4] * 2, sizes, bandwidth_Bps=1e6)
    alloc = solve(snap)
    assert alloc.boundaries[1] != 2
    assert alloc.bottleneck_ms == 3.0
    assert alloc.boundaries == (0, 1, 4)  # ties with (0, 3, 4) everywhere; lexicographic wins
    # without the huge activation the middle cut wins
    assert solve(snapshot_from_profile([[1.0] * 4] * 2, [0] * 5)).boundaries == (0, 2, 4)


def test_worker_with_too_slow_link_is_left_out() -> None:
    snap = snapshot_from_profile(
        [[1.0] * 6] * 3, [1000] * 7, bandwidth_Bps=[math.inf, 1.0, math.inf]
    )
    alloc = solve(snap)
    assert alloc.used == (0, 2)
    assert alloc.boundaries == (0, 3, 3, 6)
    assert alloc.segment(1) == (3, 3)
    assert alloc.stage_ms == (3.0, 0.0, 3.0)


def test_source_may_run_zero_blocks_but_ships_the_input() -> None:
    # the source is 10x slower; shipping the 1000-byte input at 1 MB/s costs 1 ms
    snap = snapshot_from_profile(
        [[10.0] * 4, [1.0] * 4], [1000, 0, 0, 0, 0], bandwidth_Bps=[1e6, math.inf]
    )
    alloc = solve(snap)
    assert alloc.boundaries == (0, 0, 4)
    assert alloc.used == (0, 1)
    assert alloc.stage_ms == (1.0, 4.0)
    assert alloc.latency_ms == 5.0


def test_source_can_be_left_out_when_not_required() -> None:
    snap = snapshot_from_profile(
        [[10.0] * 4, [1.0] * 4],
        [1000, 0, 0, 0, 0],
        bandwidth_Bps=[1e6, math.inf],
        must_include_source=False,
    )
    alloc = solve(snap)
    assert alloc.boundaries == (0, 0, 4)
    assert alloc.used == (1,)
    assert alloc.stage_ms == (0.0, 4.0)


def test_source_alone_pays_no_return_hop() -> None:
    snap = snapshot_from_profile([[1.0, 2.0]], [10, 10, 10], bandwidth_Bps=1.0, latency_ms=5.0)
    alloc = solve(snap)
    assert alloc.boundaries == (0, 2)
    assert alloc.stage_ms == (3.0,)
    # a remote last worker does pay the hop back to the source
    assert stage_time(snap, 0, 0, 1) == 1.0 + 10_000.0 + 5.0


def test_remote_workers_slower_than_staying_local() -> None:
    snap = snapshot_from_profile(
        [[1.0] * 4] * 3, [100] * 5, bandwidth_Bps=[1e3, 1e3, 1e3], latency_ms=0.0
    )
    # every hop costs 100 ms: the source keeps everything
    alloc = solve(snap)
    assert alloc.boundaries == (0, 4, 4, 4)
    assert alloc.used == (0,)


def test_memory_cap_is_respected() -> None:
    snap = snapshot_from_profile([[1.0] * 6] * 2, [0] * 7, max_blocks=[1, None])
    alloc = solve(snap)
    assert alloc.boundaries == (0, 1, 6)
    snap = snapshot_from_profile([[1.0] * 6] * 2, [0] * 7, max_blocks=[2, 3])
    with pytest.raises(AllocationError, match="allow 5 blocks"):
        solve(snap)


def test_tie_break_lowest_latency_then_fewest_workers() -> None:
    # bottleneck 1 ms three ways; (0,1,2,2) sums to 2.0, (0,0,1,2) and (0,1,1,2) to 1.5,
    # and (0,1,1,2) uses one worker fewer than (0,0,1,2)
    snap = snapshot_from_profile([[1.0, 1.0], [1.0, 1.0], [1.0, 0.5]], [0, 0, 0])
    alloc = solve(snap)
    assert alloc.bottleneck_ms == 1.0
    assert alloc.boundaries == (0, 1, 1, 2)
    assert alloc.latency_ms == 1.5


def test_tie_break_lexicographic_when_all_else_is_equal() -> None:
    snap = snapshot_from_profile([[0.0, 0.0]] * 3, [0, 0, 0], must_include_source=False)
    assert solve(snap).boundaries == (0, 0, 0, 2)


def test_bottlenecks_within_tolerance_count_as_equal() -> None:
    # (0,1,2): bottleneck 1.0, latency 1.5.  (0,2,2): bottleneck 1.0 + 1e-12, latency ~1.0
    near = snapshot_from_profile([[0.5, 0.5 + 1e-12], [1.0, 1.0]], [0, 0, 0])
    assert solve(near).boundaries == (0, 2, 2)
    far = snapshot_from_profile([[0.5, 0.5 + 1e-6], [1.0, 1.0]], [0, 0, 0])
    assert solve(far).boundaries == (0, 1, 2)
    assert BOTTLENECK_RTOL == 1e-9


# --- evaluate, helpers, Allocation --------------------------------------------------------


def test_evaluate_costs_a_given_allocation() -> None:
    snap = snapshot_from_profile(
        [[1.0, 2.0, 3.0], [2.0, 2.0, 2.0], [0.5, 0.5, 0.5]],
        [100, 200, 300, 400],
        bandwidth_Bps=[1e5, 2e5, 4e5],
        latency_ms=[0.1, 0.2, 0.3],
    )
    alloc = evaluate(snap, [0, 1, 1, 3])
    assert alloc.used == (0, 2)
    assert alloc.stage_ms[0] == pytest.approx(1.0 + 200 / 1e5 * 1000 + 0.1)
    assert alloc.stage_ms[1] == 0.0
    assert alloc.stage_ms[2] == pytest.approx(1.0 + 400 / 4e5 * 1000 + 0.3)
    assert alloc.bottleneck_ms == max(alloc.stage_ms)
    assert alloc.latency_ms == pytest.approx(alloc.stage_ms[0] + alloc.stage_ms[2])


def test_allocation_helpers_and_json() -> None:
    alloc = solve(snapshot_from_profile([[1.0] * 4] * 2, [0] * 5))
    assert [alloc.segment(n) for n in range(2)] == [(0, 2), (2, 4)]
    with pytest.raises(AllocationError, match="no worker 2"):
        alloc.segment(2)
    data = json.loads(json.dumps(alloc.to_dict()))
    assert data["boundaries"] == [0, 2, 4]
    assert data["segments"] == [[0, 2], [2, 4]]
    assert data["used"] == [0, 1]
    assert data["throughput_per_s"] == 500.0
    free = Allocation((0, 1), (0.0,), 0.0, 0.0, (0,))
    assert free.throughput_per_s == math.inf


def test_even_split_and_scale() -> None:
    assert even_split(10, 3) == (0, 4, 7, 10)
    assert even_split(2, 4) == (0, 1, 2, 2, 2)
    assert even_split(0, 1) == (0, 0)
    with pytest.raises(AllocationError):
        even_split(3, 0)
    assert scale([1.0, 2.5], 2.0) == (2.0, 5.0)
    with pytest.raises(AllocationError, match="slowdown"):
        scale([1.0], 0.0)


def test_snapshot_normalises_lists() -> None:
    from_lists = Snapshot([[1, 2]], [1, 2, 3], [math.inf], [0])  # type: ignore[arg-type]
    assert from_lists.block_ms == ((1.0, 2.0),)
    assert from_lists.bandwidth_Bps == (math.inf,)
    assert from_lists == Snapshot(((1.0, 2.0),), (1, 2, 3), (math.inf,), (0.0,))
    assert from_lists.workers == 1
    assert from_lists.blocks == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"block_ms": ((1.0, 2.0), (1.0,))}, "ragged rows"),
        ({"block_ms": ((1.0, -2.0), (1.0, 1.0))}, r"block_ms\[0\]\[1\]: must be finite and >= 0"),
        ({"block_ms": ((1.0, math.nan), (1.0, 1.0))}, r"block_ms\[0\]\[1\]"),
        ({"block_ms": ()}, "at least one worker"),
        ({"block_ms": ((), ())}, "at least one block"),
        ({"activation_bytes": (0, 0)}, r"need K \+ 1 = 3 entries"),
        ({"activation_bytes": (0, -1, 0)}, r"activation_bytes\[1\]"),
        ({"activation_bytes": (0, 1.5, 0)}, r"activation_bytes\[1\]"),
        ({"bandwidth_Bps": (1.0,)}, "one entry per worker"),
        ({"bandwidth_Bps": (1.0, 0.0)}, r"bandwidth_Bps\[1\]: must be > 0"),
        ({"bandwidth_Bps": (1.0, math.nan)}, r"bandwidth_Bps\[1\]"),
        ({"latency_ms": (0.0, -1.0)}, r"latency_ms\[1\]"),
        ({"max_blocks": (1, -1)}, r"max_blocks\[1\]"),
        ({"max_blocks": (1,)}, "max_blocks: need one entry per worker"),
    ],
)
def test_snapshot_validation(kwargs: dict[str, object], message: str) -> None:
    fields: dict[str, object] = {
        "block_ms": ((1.0, 1.0), (1.0, 1.0)),
        "activation_bytes": (0, 0, 0),
        "bandwidth_Bps": (1.0, 1.0),
        "latency_ms": (0.0, 0.0),
    }
    fields.update(kwargs)
    with pytest.raises(AllocationError, match=message) as info:
        Snapshot(**fields)  # type: ignore[arg-type]
    assert isinstance(info.value, ArmdiError)


@pytest.mark.parametrize(
    ("boundaries", "message"),
    [
        ((0, 2), r"need N \+ 1 = 3"),
        ((1, 1, 2), "start at 0 and end at K = 2"),
        ((0, 1, 3), "start at 0 and end at K = 2"),
        ((0, 1.0, 2), "must be ints"),
    ],
)
def test_evaluate_rejects_bad_boundaries(boundaries: tuple[int, ...], message: str) -> None:
    snap = snapshot_from_profile([[1.0, 1.0]] * 2, [0, 0, 0])
    with pytest.raises(AllocationError, match=message):
        evaluate(snap, boundaries)


def test_evaluate_rejects_decreasing_and_over_cap() -> None:
    snap = snapshot_from_profile([[1.0, 1.0]] * 3, [0, 0, 0], max_blocks=[1, None, None])
    with pytest.raises(AllocationError, match="non-decreasing"):
        evaluate(snap, (0, 2, 1, 2))
    with pytest.raises(AllocationError, match=r"max_blocks\[0\] = 1"):
        evaluate(snap, (0, 2, 2, 2))


def test_large_chain_is_fast_and_deterministic() -> None:
    blocks, workers = 48, 8
    rows = [[((n * 7 + k * 13) % 17 + 1) / 10 for k in range(blocks)] for n in range(workers)]
    sizes = [((k * 31) % 7 + 1) * 100_000 for k in range(blocks + 1)]
    snap = snapshot_from_profile(rows, sizes, bandwidth_Bps=1e8, latency_ms=0.05)
    first = solve(snap)
    assert solve(snap) == first
    assert evaluate(snap, first.boundaries) == first
    assert first.bottleneck_ms <= evaluate(snap, even_split(blocks, workers)).bottleneck_ms


# --- exhaustive cross-check on small chains ---------------------------------------------


def _brute_stage(snap: Snapshot, n: int, a: int, b: int) -> float:
    """The stage time written straight from the definition."""
    compute = list(snap.block_ms[n][a:b])
    if n == 0 and b == snap.blocks:
        return math.fsum(compute)
    transfer = snap.activation_bytes[b] / snap.bandwidth_Bps[n] * 1000.0
    return math.fsum([*compute, transfer, snap.latency_ms[n]])


def _brute_force(snap: Snapshot) -> tuple[float, tuple[int, ...]] | None:
    """(min bottleneck, best boundaries) over every allocation, or None if none fits."""
    workers, blocks = snap.workers, snap.blocks
    candidates = []
    for inner in itertools.combinations_with_replacement(range(blocks + 1), workers - 1):
        bounds = (0, *inner, blocks)
        stages = []
        fits = True
        for n in range(workers):
            a, b = bounds[n], bounds[n + 1]
            cap = None if snap.max_blocks is None else snap.max_blocks[n]
            if (cap is not None and b - a > cap) or (snap.forced(n) and b == a):
                fits = False
                break
            if b > a or (n == 0 and snap.must_include_source):
                stages.append(_brute_stage(snap, n, a, b))
        if fits:
            candidates.append((max(stages), stages, bounds))
    if not candidates:
        return None
    best = min(c[0] for c in candidates)
    limit = best + best * BOTTLENECK_RTOL
    near = [c for c in candidates if c[0] <= limit]
    _, _, chosen = min(near, key=lambda c: (sum(Fraction(s) for s in c[1]), len(c[1]), c[2]))
    return best, chosen


_TIMES = st.one_of(
    st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0]),  # many exact ties
    st.sampled_from([1.0 + 1e-12, 0.5 - 1e-13]),  # near-ties, inside the tolerance
    st.floats(0.0, 50.0, allow_nan=False, allow_infinity=False),
)


@st.composite
def _snapshots(draw: st.DrawFn) -> Snapshot:
    workers = draw(st.integers(1, 3))
    blocks = draw(st.integers(1, 6))
    rows = [draw(st.lists(_TIMES, min_size=blocks, max_size=blocks)) for _ in range(workers)]
    sizes = draw(
        st.lists(
            st.one_of(st.sampled_from([0, 1000]), st.integers(0, 10**7)),
            min_size=blocks + 1,
            max_size=blocks + 1,
        )
    )
    rates = st.one_of(st.sampled_from([math.inf, 1e6, 1e9]), st.floats(1.0, 1e10, allow_nan=False))
    bandwidth = draw(st.lists(rates, min_size=workers, max_size=workers))
    latency = draw(st.lists(_TIMES, min_size=workers, max_size=workers))
    caps = draw(
        st.none() | st.lists(st.none() | st.integers(0, blocks), min_size=workers, max_size=workers)
    )
    forced = draw(st.none() | st.lists(st.booleans(), min_size=workers, max_size=workers))
    if forced is not None:  # a worker capped at 0 blocks cannot be forced to run one
        forced = [f and (caps is None or caps[n] != 0) for n, f in enumerate(forced)]
        if sum(forced) > blocks:
            forced = None
    return Snapshot(
        block_ms=tuple(tuple(r) for r in rows),
        activation_bytes=tuple(sizes),
        bandwidth_Bps=tuple(bandwidth),
        latency_ms=tuple(latency),
        max_blocks=None if caps is None else tuple(caps),
        must_include_source=draw(st.booleans()),
        must_use=None if forced is None else tuple(forced),
    )


@settings(max_examples=400, deadline=None)
@given(_snapshots())
def test_solve_matches_brute_force(snap: Snapshot) -> None:
    expected = _brute_force(snap)
    if expected is None:
        with pytest.raises(AllocationError):
            solve(snap)
        return
    alloc = solve(snap)
    best, boundaries = expected
    assert alloc.bottleneck_ms <= best + best * BOTTLENECK_RTOL
    assert alloc.boundaries == boundaries
    assert alloc == evaluate(snap, boundaries)
    assert solve(snap) == alloc  # deterministic


@settings(max_examples=200, deadline=None)
@given(_snapshots(), st.data())
def test_evaluate_is_consistent(snap: Snapshot, data: st.DataObject) -> None:
    inner = sorted(
        data.draw(
            st.lists(
                st.integers(0, snap.blocks), min_size=snap.workers - 1, max_size=snap.workers - 1
            )
        )
    )
    bounds = (0, *inner, snap.blocks)
    try:
        alloc = evaluate(snap, bounds)
    except AllocationError:
        # only a cap or a forced worker can reject well-formed boundaries
        assert snap.max_blocks is not None or snap.must_use is not None
        return
    for n in range(snap.workers):
        a, b = alloc.segment(n)
        in_chain = b > a or (n == 0 and snap.must_include_source)
        assert (n in alloc.used) == in_chain
        assert alloc.stage_ms[n] == (_brute_stage(snap, n, a, b) if in_chain else 0.0)
    used = [alloc.stage_ms[n] for n in alloc.used]
    assert alloc.bottleneck_ms == max(used)
    assert alloc.latency_ms == math.fsum(used)
    assert solve(snap).bottleneck_ms <= alloc.bottleneck_ms + alloc.bottleneck_ms * BOTTLENECK_RTOL


# --- workers the user insists on (must_use, --min-workers) ---------------------------------


def _costly_hop() -> Snapshot:
    """Two equal workers and a link so slow that the optimum keeps everything on worker 0."""
    return snapshot_from_profile([[1.0] * 4] * 2, [10**6, 10**6, 10**6, 10**6, 0],
                                 bandwidth_Bps=1e6)


def test_the_optimum_leaves_a_worker_out_when_its_hop_costs_more_than_it_saves() -> None:
    snap = _costly_hop()
    alloc = solve(snap)
    assert alloc.boundaries == (0, 4, 4) and alloc.used == (0,)
    reason = why_left_out(snap, alloc, 1)
    assert "leaves it out" in reason and "--min-workers" in reason
    assert "1e+03 ms" in reason  # the 1 s hop it would cost
    assert why_left_out(snap, alloc, 0) == ""  # a used worker needs no reason


def test_must_use_puts_a_block_on_a_worker_even_when_it_does_not_pay() -> None:
    snap = dataclasses.replace(_costly_hop(), must_use=(False, True))
    alloc = solve(snap)
    assert alloc.used == (0, 1)
    assert alloc.boundaries[1] < alloc.boundaries[2]
    # every allocation that uses it pays one 1 s hop
    assert alloc.bottleneck_ms == pytest.approx(1000.0)
    with pytest.raises(AllocationError, match="must run at least one block"):
        evaluate(snap, (0, 4, 4))


def test_why_left_out_names_a_zero_cap() -> None:
    snap = dataclasses.replace(_costly_hop(), max_blocks=(None, 0))
    assert why_left_out(snap, solve(snap), 1) == "its max_blocks is 0"


@pytest.mark.parametrize(("caps", "forced", "match"), [
    ((None, 0), (False, True), "max_blocks"),
    (None, (True, True, True), "one entry per worker"),
])
def test_must_use_is_validated(caps: tuple[int | None, ...] | None,
                               forced: tuple[bool, ...], match: str) -> None:
    with pytest.raises(AllocationError, match=match):
        dataclasses.replace(_costly_hop(), max_blocks=caps, must_use=forced)


def test_must_use_cannot_exceed_the_blocks() -> None:
    with pytest.raises(AllocationError, match="only 1"):
        snapshot_from_profile([[1.0]] * 2, [0, 0], must_use=[True, True])
