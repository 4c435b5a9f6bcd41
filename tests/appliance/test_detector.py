"""The failure detector, as a pure function of heartbeat arrival times."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.control.detector import DetectorSettings, PhiAccrual, phi


def test_phi_grows_with_silence() -> None:
    values = [phi(t, 100.0, 20.0) for t in (50, 100, 150, 200, 300)]
    assert values == sorted(values)
    assert phi(100.0, 100.0, 20.0) == pytest.approx(-math.log10(0.5))
    assert phi(10_000.0, 100.0, 20.0) == math.inf


def test_regular_heartbeats_are_alive_and_silence_is_dead_about_half_a_second_later() -> None:
    detector = PhiAccrual()
    for k in range(50):
        detector.heartbeat(k * 0.1)
    last = 4.9
    assert not detector.dead(last + 0.1)
    assert not detector.dead(last + 0.3)
    assert detector.dead(last + 0.8)
    # the moment it is declared dead, with the defaults
    t = last
    while not detector.dead(t):
        t += 0.01
    assert 0.3 < t - last < 0.7


def test_a_jittery_sender_earns_more_patience() -> None:
    steady, jittery = PhiAccrual(), PhiAccrual()
    t = 0.0
    for k in range(60):
        steady.heartbeat(k * 0.1)
        t += 0.1 + (0.25 if k % 3 == 0 else 0.0)  # a late beat every third interval
        jittery.heartbeat(t)
    assert jittery.phi(t + 0.5) < steady.phi(5.9 + 0.5)


def test_long_gaps_in_the_history_cannot_stretch_the_threshold_past_the_ceiling() -> None:
    """A history with a few multi-second gaps (engines loading, a busy machine) makes phi
    patient: a worker paused for 3 s would outlast it. The silence ceiling still declares it
    dead, and a worker beating regularly again is alive."""
    detector = PhiAccrual()
    t = 0.0
    for k in range(100):
        t += 2.5 if k % 20 == 0 else 0.1
        detector.heartbeat(t)
    assert detector.phi(t + 2.5) < DetectorSettings().phi_threshold  # phi alone: alive
    assert not detector.dead(t + 1.9)
    assert detector.dead(t + 2.1)
    patient = PhiAccrual(DetectorSettings(max_silence_ms=60_000))
    for k in range(60):
        patient.heartbeat(k * 0.1)
    assert not patient.dead(5.9 + 0.25) and patient.dead(5.9 + 3.0)  # phi still decides


def test_a_worker_given_work_that_never_beats_is_dead_after_the_ceiling() -> None:
    detector = PhiAccrual()
    assert not detector.dead(100.0)  # nothing expected yet: nothing suspected
    detector.expect(100.0)
    detector.expect(101.0)  # the first expectation counts
    assert not detector.dead(101.9) and detector.dead(102.1)
    detector.heartbeat(102.5)  # it beats after all: phi decides from then on
    assert not detector.dead(102.6)
    detector.reset()
    assert detector.armed is None and not detector.dead(1e9)


def test_before_any_heartbeat_nothing_is_suspected_and_reset_forgets() -> None:
    detector = PhiAccrual()
    assert detector.phi(1e9) == 0.0 and not detector.dead(1e9)
    detector.heartbeat(0.0)
    assert detector.dead(10.0)
    detector.reset()
    assert not detector.dead(10.0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.05, 0.3), min_size=5, max_size=80), st.floats(0.0, 5.0))
def test_phi_is_monotone_in_silence(intervals: list[float], extra: float) -> None:
    detector = PhiAccrual(DetectorSettings())
    t = 0.0
    for gap in intervals:
        t += gap
        detector.heartbeat(t)
    assert detector.phi(t + extra) <= detector.phi(t + extra + 0.1)
    assert detector.phi(t) < DetectorSettings().phi_threshold  # just beat: alive
