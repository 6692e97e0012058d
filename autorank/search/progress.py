"""The search's progress bar (rich): one look for the profile, the knapsack run and the study."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def progress_bar(enabled: bool = True) -> Progress:
    """A rich Progress with a description, bar, n/total and elapsed time; `enabled=False` draws
    nothing (rich's own `disable`), so callers use it the same way either way."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), transient=False, disable=not enabled)
