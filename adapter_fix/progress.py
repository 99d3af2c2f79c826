"""Progress bars on stderr: the module-by-module repair, eval's generation."""

from __future__ import annotations

import time
from types import TracebackType
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from adapter_fix.display import printable
from adapter_fix.results import ModuleResult

if TYPE_CHECKING:
    from typing import Self  # Python 3.11+; annotations only (not evaluated at run time)


class _Bar:
    """A transient rich progress bar on `console`, entered and left with its owner."""

    def __init__(self, console: Console, enabled: bool, *columns: ProgressColumn) -> None:
        self.progress = Progress(
            *columns,
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled,
            transient=True,
        )

    def __enter__(self) -> Self:
        self.progress.__enter__()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.progress.__exit__(kind, error, trace)


class ModuleProgress(_Bar):
    """Modules done, weights read, ETA; silent when disabled or when stderr is not a terminal."""

    def __init__(
        self, console: Console, total: int, *, enabled: bool, label: str = "repair"
    ) -> None:
        super().__init__(
            console,
            enabled,
            TextColumn(f"[bold]{label}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("modules, {task.fields[tensors]} weights read, {task.fields[current]}"),
        )
        self.task = self.progress.add_task("repair", total=total, tensors=0, current="")

    def advance(self, module: ModuleResult, weights_read: int) -> None:
        name = escape(printable(module.name))  # the field is rendered as markup
        self.progress.update(self.task, advance=1, tensors=weights_read, current=name)


class GenerationProgress(_Bar):
    """eval: prompts done, tokens/s, ETA, and which model and prompt set is running."""

    def __init__(self, console: Console, total: int, *, enabled: bool) -> None:
        super().__init__(
            console,
            enabled,
            TextColumn("[bold]eval"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("prompts, {task.fields[speed]} tok/s, {task.fields[current]}"),
        )
        self.task = self.progress.add_task("eval", total=total, speed="-", current="")
        self.tokens = 0
        self.started = time.perf_counter()

    def __enter__(self) -> Self:
        self.started = time.perf_counter()
        return super().__enter__()

    def advance(self, prompts: int, tokens: int, current: str) -> None:
        self.tokens += tokens
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        speed = f"{self.tokens / elapsed:.0f}"
        self.progress.update(
            self.task, advance=prompts, speed=speed, current=escape(printable(current))
        )
