"""Terminal output shared by every command: the consoles, the progress bar style, the plan."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

console = Console()
err_console = Console(stderr=True)


def progress_bar() -> Progress:
    """A bar on stderr that disappears when done (the lines printed beside it stay)."""
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    )


def plan_table(plan: Any) -> Table:
    """A `kiln.load()` plan: one row per component, with the reason it was chosen."""
    title = f"plan ({plan.objective}, target {plan.target})" if plan.target else "plan"
    table = Table(title=title, caption="\n".join(plan.notes) or None)
    for column in ("component", "variant", "runtime", "device", "reason"):
        table.add_column(column, overflow="fold")
    for row in plan.rows():
        table.add_row(*(Text(cell) for cell in row))  # reasons hold [brackets]: never markup
    return table
