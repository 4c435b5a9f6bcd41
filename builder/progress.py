"""Progress reporting for long builder steps: rich bars on a terminal, silence in tests."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol, TypeVar

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
