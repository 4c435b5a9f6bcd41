"""Chord-like membership over the chain: each worker's predecessor and next r successors.

The chain is a line, not a ring: ``source -> w1 -> ... -> wN -> the source's result inbox``.
Every member has a ``rank`` (its place in the line; the source gives ranks, leaving gaps so
a joiner can be put between two members). A worker keeps

- its **predecessor** (the live member just before it), and
- its **successor list**: the next ``r`` live members after it, nearest first. An empty
  list means it is the last worker: its output goes to the source's result inbox.

**Stabilisation** (as in Chord's stabilise/notify, over a line): every ``stabilise_ms`` a
worker asks its first successor for that successor's own predecessor and successor list
(the ask doubles as *notify*: the successor takes the asker as its predecessor when it is
nearer than the one it has). The worker then

- drops the members it found dead (a successor that did not answer),
- takes in a member that joined between it and its successor (the successor's
  predecessor, when it ranks between the two), and
- rebuilds its list as ``[successor] + successor's list``, nearest r kept.

A worker whose successors all died asks the *anchor* instead (the source, which admits
every join and sees every death): its report is the live members after the asker.

Everything here is pure (no sockets, no clocks); the node's stabilisation thread feeds it
what its pings returned. ``tests/appliance/test_membership.py`` checks that random
sequences of leaves and joins converge to the right lists within a bounded number of rounds.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, replace

__all__ = [
    "DEFAULT_SUCCESSORS",
    "Member",
    "Report",
    "View",
    "merge_successors",
    "notify",
    "rank_between",
    "report_of",
    "stabilise",
    "views_from_chain",
]

DEFAULT_SUCCESSORS = 2
RANK_GAP = 1 << 20  # ranks the source gives consecutive members; joiners go in between


@dataclass(frozen=True)
class Member:
    """A worker as its peers reach it."""

    name: str
    data_addr: str
    control_addr: str
    rank: int = 0  # its place in the line (larger: further from the source)


@dataclass(frozen=True)
class View:
    """One worker's knowledge of its neighbourhood."""

    me: Member
    predecessor: Member | None
    successors: tuple[Member, ...]  # nearest first, at most r

    @property
    def successor(self) -> Member | None:
        return self.successors[0] if self.successors else None


@dataclass(frozen=True)
class Report:
    """What a pinged member says about itself: its predecessor and its successor list."""

    predecessor: Member | None
    successors: tuple[Member, ...]


def _check_r(r: int) -> None:
    if r < 1:
        raise ValueError(f"the successor list needs r >= 1, got {r}")


def views_from_chain(chain: Sequence[Member], r: int = DEFAULT_SUCCESSORS) -> dict[str, View]:
    """Every worker's view of a line of live workers given in order (source excluded)."""
    _check_r(r)
    names = [m.name for m in chain]
    if len(set(names)) != len(names):
        raise ValueError(f"a worker appears twice in the chain {names}")
    ranks = [m.rank for m in chain]
    if any(b <= a for a, b in itertools.pairwise(ranks)):
        raise ValueError(f"chain ranks must increase along the line, got {ranks}")
    return {m.name: View(m, chain[i - 1] if i > 0 else None, tuple(chain[i + 1: i + 1 + r]))
            for i, m in enumerate(chain)}


def merge_successors(me: Member, candidates: Iterable[Member], dead: Collection[str],
                     r: int = DEFAULT_SUCCESSORS) -> tuple[Member, ...]:
    """The nearest ``r`` members after ``me`` among ``candidates``: the dead, ``me`` and
    members ranked at or before ``me`` dropped, each name once (its newest entry first)."""
    _check_r(r)
    by_name: dict[str, Member] = {}
    for m in candidates:
        if m.name != me.name and m.name not in dead and m.rank > me.rank:
            by_name.setdefault(m.name, m)
    return tuple(sorted(by_name.values(), key=lambda m: m.rank)[:r])


def stabilise(view: View, report: Report | None, dead: Collection[str] = (),
              r: int = DEFAULT_SUCCESSORS) -> View:
    """One round of stabilisation at ``view.me``.

    ``report`` is what the first successor still in the list (after dropping ``dead``)
    answered, or the anchor's answer when none is left; None when nobody answered (the
    list then only loses the dead). A member that joined between us and our successor (the
    successor's predecessor, ranked between) becomes our first successor."""
    kept = [m for m in view.successors if m.name not in dead]
    candidates: list[Member] = []
    if report is not None:
        p = report.predecessor
        head = kept[0] if kept else None
        if (p is not None and p.name not in dead and p.rank > view.me.rank
                and (head is None or p.rank < head.rank)):
            candidates.append(p)  # a joiner between us and our successor
        if head is not None:
            candidates.append(head)
        candidates.extend(report.successors)  # Chord: [successor] + its list, the rest
    else:  # of ours is stale (it may hold members only our successor saw die)
        candidates.extend(kept)
    predecessor = view.predecessor
    if predecessor is not None and predecessor.name in dead:
        predecessor = None
    return replace(view, predecessor=predecessor,
                   successors=merge_successors(view.me, candidates, dead, r))


def notify(view: View, caller: Member, dead: Collection[str] = ()) -> View:
    """``caller`` thinks it is our predecessor: take it when it is nearer than the one we
    have (or ours is gone)."""
    p = view.predecessor
    if caller.name == view.me.name or caller.rank >= view.me.rank:
        return view
    if p is None or p.name in dead or p.name == caller.name or caller.rank > p.rank:
        return replace(view, predecessor=caller)
    return view


def report_of(view: View) -> Report:
    """What ``view.me`` answers to a stabilisation ping."""
    return Report(view.predecessor, view.successors)


def rank_between(before: Member | None, after: Member | None) -> int:
    """A rank for a member put between ``before`` and ``after`` (None: the line's ends)."""
    low = before.rank if before is not None else 0
    if after is None:
        return low + RANK_GAP
    if after.rank - low < 2:
        raise ValueError(f"no rank left between {low} and {after.rank}; renumber the chain")
    return (low + after.rank) // 2
