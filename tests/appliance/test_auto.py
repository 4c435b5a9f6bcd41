"""Mode auto's decision: the fastest predicted mode among those the devices' memory allows."""

from __future__ import annotations

import itertools

import pytest

from appliance.control.auto import choose, hybrid_throughput, worth_switching
from appliance.control.predict import Scenario, predict

BLOCKS = (2.0,) * 10  # 20 ms for the whole model on the reference device
SIZES = (602_112,) + (50_000,) * 9 + (4_000,)  # float32 input, activations, output


def _scenario(link_mbps: float, speeds: tuple[float, ...]) -> Scenario:
    return Scenario(block_ms=BLOCKS, activation_bytes=SIZES, link_Bps=link_mbps * 1e6 / 8,
                    speeds=speeds)


def test_on_a_fast_link_equal_workers_share_whole_requests() -> None:
    decision = choose(_scenario(1000, (1.0, 1.0)), worker_max_blocks=(None, None),
                      source_runs_blocks=True)
    by_mode = {a.mode: a for a in decision.alternatives}
    assert decision.mode == "ddi"
    assert by_mode["ddi"].throughput_ips > by_mode["armdi"].throughput_ips
    assert by_mode["ddi"].throughput_ips > by_mode["local"].throughput_ips
    assert "ddi is predicted fastest" in decision.reason


def test_a_worker_that_cannot_hold_the_model_rules_out_ddi_and_the_chain_is_used() -> None:
    decision = choose(_scenario(1000, (1.0, 1.0)), worker_max_blocks=(6, 6),
                      source_runs_blocks=False)
    by_mode = {a.mode: a for a in decision.alternatives}
    assert decision.mode == "armdi"
    assert not by_mode["ddi"].feasible and "max_blocks" in by_mode["ddi"].why
    assert not by_mode["local"].feasible and by_mode["local"].why == "the source runs no blocks"
    # the chain respects the caps: neither worker runs more than 6 blocks
    bounds = predict("armdi", Scenario(block_ms=BLOCKS, activation_bytes=SIZES,
                                       link_Bps=125e6, speeds=(1.0, 1.0), max_blocks=(6, 6)),
                     50).boundaries
    assert all(b - a <= 6 for a, b in itertools.pairwise(bounds[1:]))


def test_on_a_slow_link_the_source_keeps_the_work_when_it_can() -> None:
    # 150 KB of pixels at 5 Mbit/s: 240 ms per image on the wire, 20 ms to compute here
    decision = choose(_scenario(5, (1.0, 1.0, 1.0)), worker_max_blocks=(None,) * 3,
                      source_runs_blocks=True)
    assert decision.mode == "local"
    without = choose(_scenario(5, (1.0, 1.0, 1.0)), worker_max_blocks=(None,) * 3,
                     source_runs_blocks=False)
    assert without.mode in ("ddi", "armdi") and without.mode != "local"


def test_slower_workers_change_the_answer_and_nothing_that_fits_is_an_error() -> None:
    fast = choose(_scenario(1000, (1.0,)), worker_max_blocks=(None,), source_runs_blocks=True,
                  source_speed=4.0)
    assert fast.mode in ("ddi", "armdi")  # one worker 4x faster than the source
    slow = choose(_scenario(1000, (4.0,)), worker_max_blocks=(None,), source_runs_blocks=True)
    assert slow.mode == "local"
    with pytest.raises(ValueError, match="no mode can run"):
        choose(_scenario(1000, (1.0, 1.0)), worker_max_blocks=(3, 3), source_runs_blocks=False)
    with pytest.raises(ValueError, match="one per worker"):
        choose(_scenario(1000, (1.0, 1.0)), worker_max_blocks=(None,), source_runs_blocks=True)


def test_where_no_worker_holds_the_model_shorter_chains_side_by_side_win() -> None:
    # four workers that each hold half the model: DDI is out; one chain of four pays for
    # three cuts on every image, two chains of two for one cut on half the images each
    decision = choose(_scenario(1000, (1.0,) * 4), worker_max_blocks=(5,) * 4,
                      source_runs_blocks=False)
    by_mode = {a.mode: a for a in decision.alternatives}
    assert decision.mode == "hybrid" and decision.chain_workers == 2
    assert not by_mode["ddi"].feasible
    assert by_mode["hybrid"].throughput_ips > by_mode["armdi"].throughput_ips
    assert decision.to_dict()["alternatives"][-1]["chain_workers"] == 2  # type: ignore[index]
    # with memory for the whole model, whole requests side by side beat any chain
    free = choose(_scenario(1000, (1.0,) * 4), worker_max_blocks=(None,) * 4,
                  source_runs_blocks=False)
    assert free.mode == "ddi" and free.chain_workers == 0
    two = choose(_scenario(1000, (1.0,) * 2), worker_max_blocks=(5, 5), source_runs_blocks=False)
    assert not {a.mode: a for a in two.alternatives}["hybrid"].feasible


def test_a_switch_needs_another_choice_predicted_clearly_faster() -> None:
    scenario = _scenario(1000, (1.0,) * 6)
    caps = (5,) * 6  # half the model each: hybrid's chains of 2 or 3
    decision = choose(scenario, worker_max_blocks=caps, source_runs_blocks=False)
    assert decision.mode == "hybrid"
    best = next(a for a in decision.alternatives if a.mode == "hybrid")
    at_best = hybrid_throughput(scenario, caps, decision.chain_workers)
    assert at_best == pytest.approx(best.throughput_ips)
    assert hybrid_throughput(scenario, caps, 1) == 0.0  # a worker alone cannot hold it
    # what runs is the decision: stay, however slow the running one is said to be
    assert not worth_switching(decision, "hybrid", decision.chain_workers, 0.0, 0.25)
    # the same mode at another chain length is another choice; it must gain enough
    other = next(n for n in (2, 3) if n != decision.chain_workers)
    now = hybrid_throughput(scenario, caps, other)
    assert worth_switching(decision, "hybrid", other, now, 0.25) == (
        best.throughput_ips > now * 1.25)
    assert worth_switching(decision, "hybrid", other, best.throughput_ips / 2, 0.25)
    assert not worth_switching(decision, "armdi", 0, best.throughput_ips / 1.1, 0.25)
    assert worth_switching(decision, "armdi", 0, best.throughput_ips / 1.3, 0.25)
