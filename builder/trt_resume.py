"""Resumable TensorRT builds: a journal per model and device, progress with an ETA.

Hundreds of engine builds take hours on a Jetson, so a build must survive Ctrl-C and power
loss. Engines are written to ``<repo>/.trt-cache/<key>.engine`` (outside the staging folder a
killed build loses) and, after each one, a journal next to them records it:

```
<repo>/.trt-cache/journal-<fingerprint[:16]>-<device slug>-<precision>[-stripped].json
{"done": {"3:7": {"key": ..., "bytes": ..., "seconds": ..., "error": ...}},
 "failed": {"0:9": "why"}}
```

A re-run skips every range the journal lists as done whose engine file is still there with
the recorded size and key (no GPU work at all: neither a build, nor a load, nor a check), and
builds only what is missing. The journal is written atomically after every engine, so a crash
loses at most the engine in progress. One range that fails (parser, builder, verification) is
recorded under ``failed`` and the build goes on; nodes chain block engines for that range. A
re-run tries failed ranges again (a failure may be an out-of-memory moment).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from builder.progress import Reporter
from engines.errors import ArmdiError

JOURNAL_PREFIX = "journal-"
_FORMAT = "armdi-trt-journal-v1"


def _label(start: int, end: int) -> str:
    return f"{start}:{end}"


@dataclass(frozen=True)
class DoneEngine:
    key: str
    bytes: int
    seconds: float  # build (or reuse) time of this engine
    error: float = 0.0  # max abs error against ONNX Runtime


@dataclass
class BuildJournal:
    """What a model's TensorRT build on one device has done so far."""

    path: Path
    done: dict[tuple[int, int], DoneEngine] = field(default_factory=dict)
    failed: dict[tuple[int, int], str] = field(default_factory=dict)

    @classmethod
    def open(cls, cache_dir: Path, fingerprint: str, device_slug: str, precision: str,
             stripped: bool) -> BuildJournal:
        name = (f"{JOURNAL_PREFIX}{fingerprint[:16]}-{device_slug}-{precision}"
                f"{'-stripped' if stripped else ''}.json")
        return cls.load(Path(cache_dir) / name)

    @classmethod
    def load(cls, path: Path) -> BuildJournal:
        """The journal at ``path``; an unreadable one counts as empty (engines are rebuilt,
        or reused by the builder when they still load)."""
        journal = cls(Path(path))
        try:
            data = json.loads(journal.path.read_text())
        except (OSError, ValueError):
            return journal
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            return journal
        try:
            for label, item in dict(data.get("done", {})).items():
                start, end = (int(x) for x in label.split(":"))
                journal.done[(start, end)] = DoneEngine(str(item["key"]), int(item["bytes"]),
                                                        float(item["seconds"]),
                                                        float(item.get("error", 0.0)))
            for label, why in dict(data.get("failed", {})).items():
                start, end = (int(x) for x in label.split(":"))
                journal.failed[(start, end)] = str(why)
        except (ValueError, KeyError, TypeError):
            return cls(Path(path))
        return journal

    def save(self) -> None:
        from builder.trt_build import write_atomic

        data: dict[str, Any] = {
            "format": _FORMAT,
            "done": {_label(*r): vars(d) for r, d in sorted(self.done.items())},
            "failed": {_label(*r): why for r, why in sorted(self.failed.items())},
        }
        write_atomic(self.path, json.dumps(data, indent=1).encode())

    def is_done(self, start: int, end: int, key: str, engine_dir: Path) -> bool:
        """Done earlier with this key, and the engine file is still there, whole."""
        item = self.done.get((start, end))
        if item is None or item.key != key:
            return False
        path = Path(engine_dir) / f"{key}.engine"
        return path.is_file() and path.stat().st_size == item.bytes

    def record_done(self, start: int, end: int, item: DoneEngine) -> None:
        self.done[(start, end)] = item
        self.failed.pop((start, end), None)
        self.save()

    def record_failed(self, start: int, end: int, why: str) -> None:
        self.failed[(start, end)] = why
        self.done.pop((start, end), None)
        self.save()


def measured_seconds_per_engine(cache_dir: Path, device_slug: str) -> float | None:
    """The median build time per engine on this device, from its journals (None: no builds
    recorded yet). Reused engines (under a second) are left out."""
    times = []
    for path in Path(cache_dir).glob(f"{JOURNAL_PREFIX}*-{device_slug}-*.json"):
        times += [d.seconds for d in BuildJournal.load(path).done.values() if d.seconds >= 1.0]
    return statistics.median(times) if times else None


# --- progress ------------------------------------------------------------------------------


@dataclass
class EngineProgress:
    """Engines done, failed and remaining, and an ETA from this run's pace (or an assumed
    figure until the first engine is built)."""

    total: int
    seconds_per_engine: float
    done: int = 0
    failed: int = 0
    built_seconds: float = 0.0  # time spent on engines built (not skipped) in this run
    built: int = 0

    @property
    def remaining(self) -> int:
        return self.total - self.done - self.failed

    @property
    def eta_seconds(self) -> float:
        pace = self.built_seconds / self.built if self.built else self.seconds_per_engine
        return pace * self.remaining

    def line(self) -> str:
        eta = self.eta_seconds
        shown = f"{eta:.0f} s" if eta < 120 else (f"{eta / 60:.0f} min" if eta < 7200
                                                  else f"{eta / 3600:.1f} h")
        return (f"{self.done} done, {self.failed} failed, {self.remaining} remaining, "
                f"eta {shown}")


class EngineBar(Protocol):
    """A progress display that shows ``EngineProgress`` (``RichReporter.engine_bar``)."""

    def update(self, progress: EngineProgress) -> None: ...

    def close(self) -> None: ...


class _NoteBar:
    """For reporters without bars: a note every 10% of the work."""

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter
        self.shown = -1

    def update(self, progress: EngineProgress) -> None:
        finished = progress.done + progress.failed
        tenth = finished * 10 // max(1, progress.total)
        if tenth != self.shown or finished == progress.total:
            self.shown = tenth
            self.reporter.note(f"TensorRT engines: {progress.line()}")

    def close(self) -> None:
        pass


def engine_bar(reporter: Reporter, total: int) -> EngineBar:
    make: Callable[[int], EngineBar] | None = getattr(reporter, "engine_bar", None)
    return make(total) if make is not None else _NoteBar(reporter)


# --- the loop ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What ``run_builds`` did: engines usable now (built, reused or skipped), failures."""

    done: dict[tuple[int, int], DoneEngine]
    failed: dict[tuple[int, int], str]
    skipped: int  # done in an earlier run, not touched in this one


def run_builds(
    order: Sequence[tuple[int, int]],
    *,
    key_of: Callable[[int, int], str],
    build_one: Callable[[int, int], DoneEngine],
    journal: BuildJournal,
    engine_dir: Path,
    reporter: Reporter,
    seconds_per_engine: float,
    on_ready: Callable[[int, int, DoneEngine], None] = lambda start, end, item: None,
) -> Outcome:
    """Build ``order`` one engine at a time, most likely first, resuming from ``journal``.

    ``build_one`` builds (or reuses) and verifies one engine; an ``ArmdiError`` from it
    (parser, builder, verification) is recorded as a failure and the loop goes on. Anything
    else — Ctrl-C included — stops the loop with the journal saved up to the last engine.
    ``on_ready`` is called for every engine usable now, skipped or built.
    """
    progress = EngineProgress(len(order), seconds_per_engine)
    bar = engine_bar(reporter, len(order))
    done: dict[tuple[int, int], DoneEngine] = {}
    failed: dict[tuple[int, int], str] = {}
    skipped = 0
    try:
        for start, end in order:
            key = key_of(start, end)
            if journal.is_done(start, end, key, engine_dir):
                item = journal.done[(start, end)]
                skipped += 1
            else:
                t0 = time.perf_counter()
                try:
                    item = build_one(start, end)
                except ArmdiError as exc:
                    journal.record_failed(start, end, str(exc))
                    failed[(start, end)] = str(exc)
                    progress.failed += 1
                    reporter.note(f"TensorRT [{start}, {end}) failed, recorded; nodes chain "
                                  f"block engines there: {exc}")
                    bar.update(progress)
                    continue
                progress.built += 1
                progress.built_seconds += time.perf_counter() - t0
                journal.record_done(start, end, item)
            done[(start, end)] = item
            on_ready(start, end, item)
            progress.done += 1
            bar.update(progress)
    finally:
        bar.close()
    return Outcome(done, failed, skipped)


def failed_blocks(failed: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """The single-block ranges among ``failed``: without them no chain can stand in."""
    return sorted(r for r in failed if r[1] - r[0] == 1)
