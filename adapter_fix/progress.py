"""A progress bar on stderr for the module-by-module repair."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from adapter_fix.commands.repair import ModuleResult


class ModuleProgress:
    """Modules done, weights read, ETA; silent when disabled or when stderr is not a terminal."""

    def __init__(
        self, console: Console, total: int, *, enabled: bool, label: str = "repair"
    ) -> None:
        self.progress = Progress(
            TextColumn(f"[bold]{label}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("modules, {task.fields[tensors]} weights read, {task.fields[current]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled,
            transient=True,
        )
        self.task = self.progress.add_task("repair", total=total, tensors=0, current="")

    def __enter__(self) -> ModuleProgress:
        self.progress.__enter__()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.progress.__exit__(kind, error, trace)

    def advance(self, module: ModuleResult, weights_read: int) -> None:
        self.progress.update(self.task, advance=1, tensors=weights_read, current=module.name)
