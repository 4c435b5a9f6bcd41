"""Mode ``auto``: pick, from the measured profile, the link rates and each device's memory,
the way of running the model that the prediction says is fastest.

A pure function of what the source knows when it starts: the profile (block times on the
reference device), the activation sizes, every node's configured link, the workers' speeds
(their slowdown factors) and memory caps (``max_blocks``: a device that cannot hold every
block cannot run the whole model). The alternatives:

- ``local``: the source runs the whole model (only if it runs blocks and can hold them all);
- ``ddi``: every worker that can hold the whole model runs whole requests side by side, the
  source shipping each input (as uint8 pixels) over its link;
- ``armdi``: one chain at the exact optimum over the workers (the adaptive controller keeps
  it there as conditions change);
- ``hybrid``: DDI over chains: shorter chains side by side (``chain_workers`` each, the best
  of 2 up to one fewer than the workers), each input whole to the chain that would finish
  it first.
  It wins where no worker holds the whole model (DDI is out) and one long chain pays for
  every cut on every image: each chain's links carry only its share of the images.

Each is predicted with ``appliance.control.predict`` (the same analytical model the
``mdi-vs-ddi`` bench reports next to its measurements) and the highest predicted throughput
wins; ties go to the simpler mode (local, then ddi, then armdi, then hybrid).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

from appliance.control.predict import Prediction, PredictionError, Scenario, predict

__all__ = ["Alternative", "AutoDecision", "choose", "hybrid_throughput", "worth_switching"]

ORDER = ("local", "ddi", "armdi", "hybrid")  # simplest first: ties go to it
IMAGES = 200  # the predicted run: long enough for the pipeline's fill to matter little
WINDOW = 8


@dataclass(frozen=True)
class Alternative:
    mode: str
    feasible: bool
    throughput_ips: float  # predicted steady throughput (0 when not feasible)
    latency_ms: float  # one image through an idle system
    why: str  # why not feasible, or what it would use
    chain_workers: int = 0  # hybrid: workers per chain

    def to_dict(self) -> dict[str, object]:
        return {"mode": self.mode, "feasible": self.feasible,
                **({"chain_workers": self.chain_workers} if self.chain_workers else {}),
                "throughput_ips": round(self.throughput_ips, 2) if self.feasible else None,
                "latency_ms": round(self.latency_ms, 3) if self.feasible else None,
                "why": self.why}


@dataclass(frozen=True)
class AutoDecision:
    mode: str
    alternatives: tuple[Alternative, ...]
    reason: str

    @property
    def chain_workers(self) -> int:
        """hybrid: the chosen chains' length (0 for the other modes)."""
        return next((a.chain_workers for a in self.alternatives if a.mode == self.mode), 0)

    def to_dict(self) -> dict[str, object]:
        return {"mode": self.mode, "reason": self.reason,
                "alternatives": [a.to_dict() for a in self.alternatives]}


def choose(scenario: Scenario, *, worker_max_blocks: Sequence[int | None],
           source_runs_blocks: bool, source_max_blocks: int | None = None,
           source_speed: float = 1.0) -> AutoDecision:
    """The mode predicted fastest for ``scenario`` (its ``speeds``: one per worker, in the
    order of ``worker_max_blocks``), among those the devices' memory allows."""
    k = scenario.blocks
    if len(worker_max_blocks) != len(scenario.speeds):
        raise ValueError(f"worker_max_blocks: one per worker ({len(scenario.speeds)}), got "
                         f"{len(worker_max_blocks)}")
    alternatives = []

    def holds(cap: int | None) -> bool:
        return cap is None or cap >= k

    # local: the source alone
    if not source_runs_blocks:
        alternatives.append(Alternative("local", False, 0.0, 0.0, "the source runs no blocks"))
    elif not holds(source_max_blocks):
        alternatives.append(Alternative("local", False, 0.0, 0.0, f"the source holds at most "
                                        f"{source_max_blocks} of the {k} blocks"))
    else:
        local = predict("local", dataclasses.replace(scenario, speeds=(source_speed,),
                                                     block_ms=_scaled(scenario.block_ms,
                                                                      source_speed)),
                        IMAGES, WINDOW)
        alternatives.append(Alternative("local", True, local.throughput_ips, local.latency_ms,
                                        "the whole model on the source"))
    # ddi: the workers that can hold the whole model
    whole = [s for s, cap in zip(scenario.speeds, worker_max_blocks, strict=True) if holds(cap)]
    if not whole:
        alternatives.append(Alternative("ddi", False, 0.0, 0.0, f"no worker holds all {k} "
                                        "blocks (max_blocks)"))
    else:
        ddi = predict("ddi", dataclasses.replace(scenario, speeds=tuple(whole)), IMAGES,
                      WINDOW)
        alternatives.append(Alternative("ddi", True, ddi.throughput_ips, ddi.latency_ms,
                                        f"{len(whole)} worker(s) with the whole model"))
    # armdi: one chain over the workers (memory caps are the allocator's max_blocks)
    if sum(k if cap is None else cap for cap in worker_max_blocks) < k:
        alternatives.append(Alternative("armdi", False, 0.0, 0.0, "the workers together hold "
                                        f"fewer than the {k} blocks"))
    else:
        chain = predict("armdi", dataclasses.replace(
            scenario, max_blocks=tuple(worker_max_blocks)), IMAGES, WINDOW)
        alternatives.append(Alternative("armdi", True, chain.throughput_ips, chain.latency_ms,
                                        f"one chain, boundaries {list(chain.boundaries)}"))
    alternatives.append(_best_hybrid(scenario, worker_max_blocks))
    feasible = [a for a in alternatives if a.feasible]
    if not feasible:
        raise ValueError("no mode can run this model on these devices: "
                         + "; ".join(f"{a.mode}: {a.why}" for a in alternatives))
    best = max(feasible, key=lambda a: (round(a.throughput_ips, 6), -ORDER.index(a.mode)))
    others = ", ".join(f"{a.mode} {a.throughput_ips:.1f}" for a in feasible if a is not best)
    reason = (f"{best.mode} is predicted fastest: {best.throughput_ips:.1f} img/s"
              + (f" (against {others})" if others else " (the only one that fits)"))
    return AutoDecision(best.mode, tuple(alternatives), reason)


def hybrid_throughput(scenario: Scenario, worker_max_blocks: Sequence[int | None],
                      chain_workers: int) -> float:
    """hybrid's predicted throughput at ``chain_workers`` (0 where no such chain holds the
    model): what a running hybrid is worth, to weigh a switch against."""
    p = _predict_hybrid(scenario, worker_max_blocks, chain_workers)
    return 0.0 if p is None else p.throughput_ips


def _predict_hybrid(scenario: Scenario, worker_max_blocks: Sequence[int | None],
                    chain_workers: int) -> Prediction | None:
    """hybrid's prediction at ``chain_workers``; None where no such chain holds the model."""
    try:
        return predict("hybrid", dataclasses.replace(
            scenario, max_blocks=tuple(worker_max_blocks), chain_workers=chain_workers),
            IMAGES, WINDOW)
    except PredictionError:
        return None


def worth_switching(decision: AutoDecision, mode: str, chain_workers: int,
                    current_ips: float, gain: float) -> bool:
    """Whether auto should leave what runs (``mode``; for hybrid also its chain length) for
    ``decision``: another choice, predicted over ``gain`` faster than ``current_ips``."""
    same = decision.mode == mode and (mode != "hybrid"
                                      or decision.chain_workers == chain_workers)
    best = next(a.throughput_ips for a in decision.alternatives if a.mode == decision.mode)
    return not same and best > current_ips * (1 + gain)


def _best_hybrid(scenario: Scenario, worker_max_blocks: Sequence[int | None]) -> Alternative:
    """hybrid at its best chain length: 2 up to one fewer than the workers (1 is ddi, all
    of them one chain)."""
    workers = len(worker_max_blocks)
    if workers < 3:
        return Alternative("hybrid", False, 0.0, 0.0, "needs 3 or more workers (chains of 2 "
                           "or more, side by side)")
    best: Alternative | None = None
    for length in range(2, workers):
        p = _predict_hybrid(scenario, worker_max_blocks, length)
        if p is None:
            continue  # no chain of this length holds the model
        why = f"{len(p.chains)} chains of {length} worker(s) side by side"
        if best is None or round(p.throughput_ips, 6) > round(best.throughput_ips, 6):
            best = Alternative("hybrid", True, p.throughput_ips, p.latency_ms, why, length)
    return best or Alternative("hybrid", False, 0.0, 0.0, "no chain shorter than all the "
                               "workers holds the model (max_blocks)")


def _scaled(block_ms: Sequence[float], speed: float) -> tuple[float, ...]:
    return tuple(t * speed for t in block_ms) if not math.isclose(speed, 1.0) else tuple(
        block_ms)
