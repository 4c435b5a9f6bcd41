"""Membership (pure): successor lists from a chain, stabilisation, joins, convergence."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.control.membership import (
    RANK_GAP,
    Member,
    Report,
    View,
    merge_successors,
    notify,
    rank_between,
    report_of,
    stabilise,
    views_from_chain,
)


def _member(i: int, rank: int | None = None) -> Member:
    return Member(f"w{i}", f"ipc:///tmp/w{i}.data", f"ipc:///tmp/w{i}.ctl",
                  rank if rank is not None else i * RANK_GAP)


def _names(members: tuple[Member, ...]) -> list[str]:
    return [m.name for m in members]


def test_views_from_a_chain_give_predecessor_and_next_r() -> None:
    chain = [_member(i) for i in range(1, 5)]
    views = views_from_chain(chain, r=2)
    assert views["w1"].predecessor is None and _names(views["w1"].successors) == ["w2", "w3"]
    assert views["w2"].predecessor == chain[0] and _names(views["w2"].successors) == ["w3", "w4"]
    assert _names(views["w3"].successors) == ["w4"]
    assert views["w4"].successors == () and views["w4"].successor is None  # the last one


def test_views_refuse_bad_chains() -> None:
    with pytest.raises(ValueError, match="twice"):
        views_from_chain([_member(1), _member(1)])
    with pytest.raises(ValueError, match="increase"):
        views_from_chain([_member(2), _member(1)])
    with pytest.raises(ValueError, match="r >= 1"):
        views_from_chain([_member(1)], r=0)


def test_stabilise_drops_a_dead_successor_and_takes_its_successors_list() -> None:
    views = views_from_chain([_member(i) for i in range(1, 6)], r=2)
    # w2 is dead; w1 pinged w3 (its next live successor), which reports [w4, w5]
    new = stabilise(views["w1"], report_of(views["w3"]), dead={"w2"})
    assert _names(new.successors) == ["w3", "w4"]


def test_stabilise_takes_in_a_joiner_between_us_and_our_successor() -> None:
    w1, w2, w3 = _member(1), _member(2), _member(3)
    joiner = Member("j", "d", "c", rank_between(w1, w2))
    views = views_from_chain([w1, w2, w3], r=2)
    w2_view = notify(views["w2"], joiner)  # the joiner pinged w2, its successor
    assert w2_view.predecessor == joiner
    new = stabilise(views["w1"], report_of(w2_view))
    assert _names(new.successors) == ["j", "w2"]


def test_notify_keeps_the_nearer_predecessor() -> None:
    w1, w2, w3 = _member(1), _member(2), _member(3)
    view = View(w3, w2, ())
    assert notify(view, w1).predecessor == w2  # w1 is further away than w2
    assert notify(view, w1, dead={"w2"}).predecessor == w1  # ... unless w2 is gone
    assert notify(view, w3).predecessor == w2  # not itself


def test_without_an_answer_only_the_dead_go() -> None:
    views = views_from_chain([_member(i) for i in range(1, 5)], r=3)
    assert _names(stabilise(views["w1"], None, dead={"w3"}).successors) == ["w2", "w4"]


def test_merge_keeps_order_and_ignores_members_before_me() -> None:
    me = _member(3)
    got = merge_successors(me, [_member(5), _member(1), _member(4), me, _member(4)], (), r=2)
    assert _names(got) == ["w4", "w5"]


def test_rank_between_goes_between_and_says_when_full() -> None:
    a, b = _member(1), _member(2)
    assert a.rank < rank_between(a, b) < b.rank
    assert rank_between(None, a) < a.rank and rank_between(b, None) > b.rank
    with pytest.raises(ValueError, match="renumber"):
        rank_between(Member("x", "d", "c", 5), Member("y", "d", "c", 6))


# ---------------------------------------------------------------- convergence (simulated)
class _Line:
    """A simulated cluster: views per member, who is alive, and the anchor (the source),
    which admits joins and knows the live members."""

    def __init__(self, size: int, r: int) -> None:
        self.r = r
        chain = [_member(i) for i in range(1, size + 1)]
        self.views = views_from_chain(chain, r)
        self.alive = {m.name for m in chain}
        self.next_id = size + 1

    def live(self) -> list[Member]:
        return sorted((v.me for n, v in self.views.items() if n in self.alive),
                      key=lambda m: m.rank)

    def anchor_report(self, me: Member) -> Report:
        return Report(None, tuple(m for m in self.live() if m.rank > me.rank)[: self.r])

    def leave(self, index: int) -> None:
        live = self.live()
        if len(live) > 1:
            self.alive.discard(live[index % len(live)].name)

    def join(self, index: int, via: int) -> None:
        """A new member joins through any live member: the request reaches the anchor, which
        puts it at a place in the line and tells it its successors; it then notifies its
        successor."""
        live = self.live()
        slot = index % (len(live) + 1)
        before = live[slot - 1] if slot > 0 else None
        after = live[slot] if slot < len(live) else None
        try:
            rank = rank_between(before, after)
        except ValueError:
            return  # no room there; another event
        _ = live[via % len(live)]  # whichever member it asked, the join ends at the anchor
        new = _member(self.next_id, rank)
        self.next_id += 1
        self.views[new.name] = View(new, before, self.anchor_report(new).successors)
        self.alive.add(new.name)
        if after is not None:
            self.views[after.name] = notify(self.views[after.name], new)

    def round(self, order: list[int]) -> None:
        """Every live member stabilises once, in an order drawn by the test."""
        live = self.live()
        turns = sorted(range(len(live)), key=lambda i: (order[i % len(order)] if order else 0, i))
        for k in turns:
            me = live[k]
            view = self.views[me.name]
            dead = {m.name for m in view.successors if m.name not in self.alive}
            if view.predecessor is not None and view.predecessor.name not in self.alive:
                dead.add(view.predecessor.name)
            target = next((m for m in view.successors if m.name in self.alive), None)
            if target is None:
                report = self.anchor_report(me)
            else:
                report = report_of(self.views[target.name])
                self.views[target.name] = notify(
                    self.views[target.name], me,
                    dead={n for n in [getattr(self.views[target.name].predecessor, "name", None)]
                          if n is not None and n not in self.alive})
            self.views[me.name] = stabilise(view, report, dead, self.r)

    def correct(self) -> bool:
        want = views_from_chain(self.live(), self.r)
        return all(self.views[n].successors == v.successors
                   and self.views[n].predecessor == v.predecessor for n, v in want.items())


_events = st.lists(
    st.one_of(
        st.tuples(st.just("leave"), st.integers(0, 50), st.just(0)),
        st.tuples(st.just("join"), st.integers(0, 50), st.integers(0, 50)),
        st.tuples(st.just("round"), st.just(0), st.just(0)),
    ),
    max_size=25,
)


@settings(max_examples=200, deadline=None)
@given(size=st.integers(1, 8), r=st.integers(1, 3), events=_events,
       order=st.lists(st.integers(0, 50), max_size=20))
def test_random_leaves_and_joins_converge_within_bounded_rounds(
        size: int, r: int, events: list[tuple[str, int, int]], order: list[int]) -> None:
    line = _Line(size, r)
    for kind, a, b in events:
        if kind == "leave":
            line.leave(a)
        elif kind == "join":
            line.join(a, b)
        else:
            line.round(order)
    bound = len(events) + r + 2  # a joiner moves in one place per round; lists in r
    for _ in range(bound):
        if line.correct():
            break
        line.round(order)
    assert line.correct(), {n: (_names(v.successors), v.predecessor and v.predecessor.name)
                            for n, v in line.views.items() if n in line.alive}
