"""Progress reporting for long builder steps: rich bars on a terminal, silence in tests."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Protocol, TypeVar

if TYPE_CHECKING:
    from builder.trt_resume import EngineProgress

T = TypeVar("T")


class Reporter(Protocol):
    def track(self, items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
        ...

    def note(self, message: str) -> None: ...


class SilentReporter:
    def track(self, items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
        yield from items

    def note(self, message: str) -> None:
        pass


class RichReporter:
    """Bars on stderr via rich; each ``track`` gets its own bar that stays when done."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)

    def track(self, items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns = (TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
        with Progress(*columns, console=self.console, transient=False) as progress:
            yield from progress.track(items, total=total, description=description)

    def note(self, message: str) -> None:
        self.console.print(message)

    def engine_bar(self, total: int) -> _RichEngineBar:
        """A bar for TensorRT engines: done, failed and remaining, with an ETA."""
        return _RichEngineBar(self.console, total)


class _RichEngineBar:
    def __init__(self, console: object, total: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self._progress = Progress(TextColumn("{task.description:<28}"), BarColumn(),
                                  MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
                                  console=console, transient=False)  # type: ignore[arg-type]
        self._task = self._progress.add_task("build TensorRT engines", total=total,
                                             status="")
        self._progress.start()

    def update(self, progress: EngineProgress) -> None:
        done, failed = progress.done, progress.failed
        self._progress.update(self._task, completed=done + failed,
                              status=progress.line())

    def close(self) -> None:
        self._progress.stop()
