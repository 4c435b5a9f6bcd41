"""The analytical prediction: hand-checkable cases of each mode."""

from __future__ import annotations

import math

import pytest

from appliance.control.predict import PredictionError, Scenario, mdi_allocation, predict


def _scenario(**changes: object) -> Scenario:
    base: dict[str, object] = {
        "block_ms": (10.0, 10.0), "activation_bytes": (4000, 8000, 400),
        "link_Bps": math.inf, "speeds": (1.0, 1.0)}
    base.update(changes)
    return Scenario(**base)  # type: ignore[arg-type]


def test_local_runs_one_image_after_another() -> None:
    p = predict("local", _scenario(), images=10)
    assert p.time_s == pytest.approx(0.2)
    assert p.throughput_ips == pytest.approx(50.0) and p.latency_ms == pytest.approx(20.0)


def test_ddi_on_free_links_is_the_workers_side_by_side() -> None:
    p = predict("ddi", _scenario(), images=10)
    assert p.throughput_ips == pytest.approx(100.0)
    assert p.time_s == pytest.approx(0.1)  # 5 images each, 20 ms apiece
    slow = predict("ddi", _scenario(speeds=(1.0, 3.0)), images=10)
    assert slow.bottleneck_ms == pytest.approx(1 / (1 / 20 + 1 / 60))


def test_ddi_is_held_by_the_sources_link_when_inputs_are_big() -> None:
    # 1000 B of uint8 pixels per image on a 10 kB/s link: 100 ms each, workers idle
    p = predict("ddi", _scenario(link_Bps=10_000.0), images=10)
    assert p.bottleneck_ms == pytest.approx(100.0)
    assert p.time_s == pytest.approx(1.0 + 0.02 + 0.04, rel=1e-6)  # + compute + result
    # a 250 B encoded image: 25 ms on the link, now the workers (20 + 40 ms each) hold it
    jpeg = predict("ddi", _scenario(link_Bps=10_000.0, input_bytes=250), images=10)
    assert jpeg.bottleneck_ms == pytest.approx(30.0)


def test_mdi_pipelines_the_optimum_chain() -> None:
    p = predict("edgepipe", _scenario(), images=10)
    assert p.boundaries == (0, 0, 1, 2)
    assert p.bottleneck_ms == pytest.approx(10.0)
    assert p.time_s == pytest.approx(0.11)  # fill (2 stages) + 9 more at the bottleneck
    armdi = predict("armdi", _scenario(), images=10)
    assert (armdi.mode, armdi.time_s) == ("armdi", p.time_s)


def test_float16_halves_the_activation_on_the_wire() -> None:
    slow = _scenario(link_Bps=100_000.0)  # the cut ships 8000 B: 80 ms (40 as float16)
    f32, f16 = mdi_allocation(slow), mdi_allocation(
        Scenario(**{**slow.__dict__, "wire_dtype": "float16"}))
    assert f32.bottleneck_ms == f16.bottleneck_ms == pytest.approx(24.0)  # one worker: no cut
    fast = _scenario(link_Bps=400_000.0)  # the cut: 20 ms as float32, 10 ms as float16
    p32 = predict("edgepipe", fast, 20)
    p16 = predict("edgepipe", Scenario(**{**fast.__dict__, "wire_dtype": "float16"}), 20)
    assert p32.bottleneck_ms == pytest.approx(21.0) and len(p32.boundaries) == 4
    assert p16.bottleneck_ms == pytest.approx(20.0) and p16.boundaries == (0, 0, 1, 2)


def test_a_window_of_one_is_one_image_at_a_time() -> None:
    p = predict("edgepipe", _scenario(latency_ms=1.0), images=5, window=1)
    assert p.time_s * 1000 == pytest.approx(5 * p.latency_ms)
    assert p.latency_p50_ms == pytest.approx(p.latency_ms)


@pytest.mark.parametrize("changes", [
    {"block_ms": ()}, {"activation_bytes": (1, 2)}, {"link_Bps": 0.0}, {"speeds": (0.0,)},
    {"wire_dtype": "int8"}, {"latency_ms": -1.0}, {"input_bytes": -5},
    {"overhead_ms": math.nan}])
def test_bad_scenarios_are_refused_with_the_field(changes: dict[str, object]) -> None:
    with pytest.raises(PredictionError, match=next(iter(changes))):
        _scenario(**changes)


def test_bad_modes_and_counts_are_refused() -> None:
    with pytest.raises(PredictionError, match="mode 'auto'"):
        predict("auto", _scenario(), 1)
    with pytest.raises(PredictionError, match="images"):
        predict("ddi", _scenario(), 0)


def test_the_runtime_overhead_adds_to_every_node() -> None:
    over = _scenario(overhead_ms=1.0)
    assert predict("local", over, 10).time_s == pytest.approx(0.21)
    assert predict("edgepipe", over, 10).bottleneck_ms == pytest.approx(11.0)
    assert predict("ddi", over, 10).bottleneck_ms == pytest.approx(10.5)  # (20 + 1) / 2
    fast = _scenario(block_ms=(0.01, 0.01), speeds=(1.0, 1.0, 1.0), overhead_ms=1.0)
    assert predict("ddi", fast, 10).bottleneck_ms == pytest.approx(1.0)  # the source's part


def test_hybrid_runs_shorter_chains_side_by_side() -> None:
    # four workers that each hold one of the two blocks: two chains of two, 10 ms stages
    s = _scenario(speeds=(1.0,) * 4, max_blocks=(1,) * 4, chain_workers=2)
    p = predict("hybrid", s, images=20)
    assert p.chains == ((0, 1), (2, 3))
    assert p.bottleneck_ms == pytest.approx(5.0)  # each chain a 10 ms pace, side by side
    assert p.time_s == pytest.approx(0.11)  # 10 images per chain: 20 ms fill + 9 x 10 ms
    one = predict("edgepipe", s, images=20)
    assert one.bottleneck_ms == pytest.approx(10.0) and one.time_s > p.time_s
    assert p.to_dict()["chains"] == [[0, 1], [2, 3]]


def test_hybrid_leaves_out_a_chain_that_cannot_hold_the_model() -> None:
    three = _scenario(speeds=(1.0,) * 3, max_blocks=(1,) * 3, chain_workers=2)
    assert predict("hybrid", three, images=5).chains == ((0, 1),)  # w3 alone holds 1 of 2
    with pytest.raises(PredictionError, match="no chain of 1 worker"):
        predict("hybrid", _scenario(max_blocks=(1, 1), chain_workers=1), images=5)
    with pytest.raises(PredictionError, match="chain_workers"):
        _scenario(chain_workers=0)
