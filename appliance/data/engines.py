"""A node's engines: any range at once, fused segments swapped in without downtime.

``get(start, end)`` never waits for a fused segment engine to load. When the fused engine of
a range is not loaded yet, it returns the range as a chain of block engines (small, loaded
once and kept) and asks a background thread to load the fused one; the next frame after that
load uses it. ``preload`` asks for likely next ranges the same way. Fused engines are kept in
least-recently-used order within a memory budget (the growth of the process's resident memory
while each loaded); the engine in use is the most recently used, so it is never the one
evicted.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from engines.base import BaseEngine, Engine
from engines.manifest import Manifest
from engines.repository import ModelRepository

log = logging.getLogger("armdi.engines")

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_bytes() -> int:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):  # not Linux: no budget accounting
        return 0


class _Chain(BaseEngine):
    """Block engines run back to back; it does not own them (the cache does)."""

    def __init__(self, parts: list[Engine]) -> None:
        self.parts = parts
        self.backend = f"chain({parts[0].backend})"
        super().__init__(parts[0].start, parts[-1].end, parts[0].input_spec,
                         parts[-1].output_spec)

    def _infer_impl(self, x: np.ndarray) -> np.ndarray:
        for part in self.parts:
            x = part.infer(x)
        return x

    def close(self) -> None:
        pass


class EngineCache:
    def __init__(self, repository: ModelRepository, manifest: Manifest, backend: str,
                 threads: int = 1, budget_mb: float = 512.0) -> None:
        self.repository = repository
        self.manifest = manifest
        self.backend = backend
        self.threads = threads
        self.budget = int(budget_mb * 1024 * 1024)
        self._lock = threading.Lock()
        self._blocks: dict[int, Engine] = {}
        self._fused: OrderedDict[tuple[int, int], tuple[Engine, int]] = OrderedDict()
        self._chains: dict[tuple[int, int], Engine] = {}
        self._wanted: set[tuple[int, int]] = set()
        self._queue: queue.Queue[tuple[int, int] | None] = queue.Queue()
        self._loader: threading.Thread | None = None
        self._current: tuple[int, int] | None = None  # the range in use: never evicted
        self.last_load_ms = 0.0
        self.loads = 0

    # ------------------------------------------------------------------ use
    def get(self, start: int, end: int) -> Engine:
        """An engine for ``[start, end)`` now: the fused one if loaded, else a chain."""
        key = (start, end)
        with self._lock:
            self._current = key
            hit = self._fused.get(key)
            if hit is not None:
                self._fused.move_to_end(key)
                return hit[0]
            chain = self._chains.get(key)
        if self._has_fused(key):
            self._request(key)
        if chain is None:
            chain = self._chain(start, end)
        return chain

    def load_now(self, start: int, end: int) -> Engine:
        """Load ``[start, end)`` before returning (a node does this before taking traffic);
        the fused engine when one was built."""
        key = (start, end)
        if self._has_fused(key):
            with self._lock:
                hit = self._fused.get(key)
            if hit is None:
                self._load(key)
        return self.get(start, end)

    def warm_blocks(self) -> None:
        """Open every block engine in the background, so any range can run at once (chained)
        when a failure or a move hands this node blocks it has not run before."""
        def warm() -> None:
            for k in range(self.manifest.blocks):
                try:
                    self._chain(k, k + 1)
                except Exception as exc:
                    log.warning("could not open block engine %d: %s", k, exc)
                    return
        threading.Thread(target=warm, name="engine-warm", daemon=True).start()

    def preload(self, ranges: Iterable[tuple[int, int]]) -> None:
        """Load these ranges' fused engines in the background (those that exist)."""
        for key in ranges:
            if self._has_fused(key):
                self._request(key)

    def provisional(self, engine: Engine) -> bool:
        """Whether ``engine`` is chained blocks standing in while the range's fused engine
        loads (its times say little about the range's steady state)."""
        return isinstance(engine, _Chain) and self._has_fused((engine.start, engine.end))

    def loaded(self) -> list[tuple[int, int]]:
        with self._lock:
            return list(self._fused)

    def close(self) -> None:
        if self._loader is not None:
            self._queue.put(None)
            self._loader.join(timeout=10)
        with self._lock:
            engines = [e for e, _ in self._fused.values()] + list(self._blocks.values())
            self._fused.clear()
            self._blocks.clear()
            self._chains.clear()
        for engine in engines:
            engine.close()

    # ------------------------------------------------------------------ internals
    def _has_fused(self, key: tuple[int, int]) -> bool:
        start, end = key
        return (0 <= start < end <= self.manifest.blocks and end - start > 1
                and self.manifest.segment(self.backend, start, end) is not None)

    def _chain(self, start: int, end: int) -> Engine:
        parts = []
        for k in range(start, end):
            with self._lock:
                block = self._blocks.get(k)
            if block is None:
                block = self.repository.open_engine(self.manifest, k, k + 1,
                                                    backend=self.backend,
                                                    threads=self.threads)
                with self._lock:
                    block = self._blocks.setdefault(k, block)
            parts.append(block)
        engine: Engine = parts[0] if len(parts) == 1 else _Chain(parts)
        with self._lock:
            self._chains[(start, end)] = engine
        return engine

    def _request(self, key: tuple[int, int]) -> None:
        with self._lock:
            if key in self._fused or key in self._wanted:
                return
            self._wanted.add(key)
            if self._loader is None:
                self._loader = threading.Thread(target=self._load_loop, name="engine-loader",
                                                daemon=True)
                self._loader.start()
        self._queue.put(key)

    def _load_loop(self) -> None:
        while True:
            key = self._queue.get()
            if key is None:
                return
            try:
                self._load(key)
            except Exception as exc:  # a range that cannot load keeps running chained
                log.warning("could not load the fused engine [%d, %d): %s", *key, exc)
            finally:
                with self._lock:
                    self._wanted.discard(key)

    def _load(self, key: tuple[int, int]) -> None:
        rss0, t0 = _rss_bytes(), time.perf_counter()
        engine = self.repository.open_engine(self.manifest, *key, backend=self.backend,
                                             threads=self.threads)
        cost = max(0, _rss_bytes() - rss0)
        self.last_load_ms = (time.perf_counter() - t0) * 1000
        self.loads += 1
        evicted = []
        with self._lock:
            self._fused[key] = (engine, cost)
            self._chains.pop(key, None)
            used = sum(c for _, c in self._fused.values())
            for old_key in list(self._fused):
                if used <= self.budget:
                    break
                if old_key in (key, self._current):
                    continue
                old, old_cost = self._fused.pop(old_key)
                used -= old_cost
                evicted.append(old)
        for old in evicted:
            old.close()
        log.debug("loaded the fused engine [%d, %d) in %.1f ms (%.1f MB)", *key,
                  self.last_load_ms, cost / 1e6)
