"""ddi/hybrid's pick among units (workers or chains): the one that would finish first."""

from __future__ import annotations

from collections import Counter

from appliance.data.source import earliest_finish


def _spread(pace: dict[str, float], requests: int, done_every: int = 0) -> Counter[str]:
    """Pick ``requests`` times; every ``done_every`` picks, each unit finishes one."""
    load: Counter[str] = Counter()
    names = list(pace)
    turn = 0
    for i in range(1, requests + 1):
        chosen = earliest_finish(names, load, pace, turn)
        turn = names.index(chosen) + 1
        load[chosen] += 1
        if done_every and i % done_every == 0:
            for n in names:
                load[n] = max(0, load[n] - 1)
    return load


def test_equal_units_take_turns() -> None:
    pace = {"w1": 10.0, "w2": 10.0, "w3": 10.0}
    assert _spread(pace, 9) == Counter({"w1": 3, "w2": 3, "w3": 3})
    assert earliest_finish(["w1", "w2"], {"w1": 1}, {"w1": 10.0, "w2": 10.0}, 0) == "w2"
    # readings within a few per cent of each other are still equals: in turn
    assert earliest_finish(["w1", "w2"], {}, {"w1": 10.0, "w2": 10.3}, 1) == "w2"


def test_a_slow_unit_gets_its_share_not_an_equal_one() -> None:
    pace = {"fast1": 10.0, "fast2": 10.0, "slow": 40.0}
    load = _spread(pace, 9)  # 9 at once: 4 + 4 + 1 finish by 50 ms; 3 + 3 + 3 would be 120
    assert load == Counter({"fast1": 4, "fast2": 4, "slow": 1})
    # what it holds counts: a slow unit with nothing beats a fast one holding four
    assert earliest_finish(["fast1", "slow"], {"fast1": 4}, pace, 0) == "slow"


def test_an_unknown_pace_counts_as_the_fastest_known() -> None:
    assert earliest_finish(["new", "old"], {"new": 0, "old": 0}, {"old": 20.0}, 0) == "new"
    assert earliest_finish(["a", "b"], {"a": 2}, {}, 0) == "b"  # none known: by load
