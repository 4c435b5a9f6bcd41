"""The node's hook for fused TensorRT engines built on demand.

A node whose range has no fused engine serves it with chained block engines (``EngineCache``)
and asks for the fused engine here. ``FusedBuilds`` runs one build at a time, each in its own
low-priority process (``nice 19``, ``python -m builder.trt_ondemand``), so a build of minutes
never holds the node's CUDA thread or its event loop, and the node never imports the builder.
While requests are queued on the node, the build is paused (``SIGSTOP``) and resumed
(``SIGCONT``) when the queue is empty, so serving always comes first.

How a node uses it (three calls, none blocking):

```
builds = FusedBuilds(repo_root, model_id)            # at start, TensorRT backend only
builds.request(start, end)                           # range served chained, fused missing
builds.set_busy(queue_length > 0)                    # whenever the queue changes
for start, end in builds.poll():                     # now and then (e.g. each heartbeat)
    cache.manifest = repository.load_manifest(model_id)   # the new engine is listed
```
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

log = logging.getLogger("armdi.engines")

Launcher = Callable[[Sequence[str]], "subprocess.Popen[bytes]"]


def _launch(argv: Sequence[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, preexec_fn=lambda: os.nice(19))


class FusedBuilds:
    """Fused engines built in the background, one at a time, paused while the node is busy."""

    def __init__(self, repo_root: Path, model_id: str, *, python: str = sys.executable,
                 launch: Launcher = _launch) -> None:
        self.repo_root = Path(repo_root)
        self.model_id = model_id
        self.python = python
        self._launch = launch
        self._pending: collections.deque[tuple[int, int]] = collections.deque()
        self._running: tuple[tuple[int, int], subprocess.Popen[bytes]] | None = None
        self._paused = False
        self._busy = False
        self.failed: dict[tuple[int, int], str] = {}

    def command(self, start: int, end: int) -> list[str]:
        return [self.python, "-m", "builder.trt_ondemand", "--repo", str(self.repo_root),
                self.model_id, str(start), str(end)]

    def request(self, start: int, end: int) -> None:
        """Ask for ``[start, end)``'s fused engine (once; a failed range is not retried)."""
        key = (start, end)
        running = self._running[0] if self._running else None
        if end - start < 2 or key == running or key in self._pending or key in self.failed:
            return
        self._pending.append(key)
        self._start_next()

    def set_busy(self, busy: bool) -> None:
        """Pause the build while requests are queued on the node; resume when idle."""
        self._busy = busy
        if self._running is None:
            if not busy:
                self._start_next()
            return
        process = self._running[1]
        if busy and not self._paused:
            self._signal(process, signal.SIGSTOP)
            self._paused = True
        elif not busy and self._paused:
            self._signal(process, signal.SIGCONT)
            self._paused = False

    def poll(self) -> list[tuple[int, int]]:
        """Ranges whose fused engine was built since the last poll (reload the manifest)."""
        finished: list[tuple[int, int]] = []
        if self._running is not None:
            key, process = self._running
            code = process.poll()
            if code is not None:
                self._running, self._paused = None, False
                if code == 0:
                    finished.append(key)
                else:
                    why = (process.stderr.read().decode(errors="replace").strip()
                           if process.stderr else "") or f"exit status {code}"
                    self.failed[key] = why
                    log.warning("the fused engine [%d, %d) of %s was not built (%s); the "
                                "range keeps running chained", *key, self.model_id, why)
        self._start_next()
        return finished

    @property
    def running(self) -> tuple[int, int] | None:
        return self._running[0] if self._running else None

    @property
    def paused(self) -> bool:
        return self._paused

    def close(self) -> None:
        """Stop the build in progress (it resumes from its journal next time)."""
        self._pending.clear()
        if self._running is None:
            return
        _, process = self._running
        self._signal(process, signal.SIGCONT)
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        self._running = None

    def _start_next(self) -> None:
        if self._running is not None or self._busy or not self._pending:
            return
        key = self._pending.popleft()
        self._running = (key, self._launch(self.command(*key)))
        self._paused = False

    @staticmethod
    def _signal(process: subprocess.Popen[bytes], signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signum)
