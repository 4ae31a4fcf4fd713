"""The one progress display of the command line: a rich bar with bytes (or items), rate and ETA
on stderr. Commands own their bars; library bars (transformers, huggingface_hub) are switched off
in `mergelab.cli.main`, so nothing else draws on the terminal."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator


@contextlib.contextmanager
def progress_bar(description: str, total: float, *, unit: str = "bytes", quiet: bool = False
                 ) -> Iterator[Callable[[float], None]]:
    """Yield `advance(n)`. `unit` "bytes" shows done/total bytes and bytes/s; anything else counts
    items ("3/10 trials"). Quiet, or a zero total, draws nothing."""
    if quiet or total <= 0:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeRemainingColumn, TransferSpeedColumn)

    counts = [DownloadColumn(), TransferSpeedColumn()] if unit == "bytes" else [MofNCompleteColumn(), TextColumn(unit)]
    columns = [TextColumn("{task.description}"), BarColumn(), *counts, TextColumn("ETA"), TimeRemainingColumn()]
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(description, total=total)
        try:
            yield lambda n: bar.advance(task, n)
        except BaseException:
            bar.live.transient = True  # an error's paragraph stands alone, without a half bar above it
            raise


@contextlib.contextmanager
def count_bar(description: str, unit: str = "tensors", *, quiet: bool = False
              ) -> Iterator[Callable[[int, int], None]]:
    """Yield `update(done, total)` for work whose total is known only once it starts (an export
    reports (tensor i, of n): pass it as the engine's `on_tensor`); the bar appears at the first
    update. On a terminal it redraws with the count and ETA; elsewhere (a pipe, a log, a test's
    capture) rich writes only its last state, one line on stderr without control codes."""
    if quiet:
        yield lambda done, total: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    state: dict = {}

    def update(done: int, total: int) -> None:
        if "bar" not in state:
            state["bar"] = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                    TextColumn(unit), TextColumn("ETA"), TimeRemainingColumn(),
                                    console=Console(stderr=True))
            state["bar"].start()
            state["task"] = state["bar"].add_task(description, total=total)
        state["bar"].update(state["task"], completed=done, total=total)

    try:
        yield update
    except BaseException:
        if "bar" in state:
            state["bar"].live.transient = True  # an error's paragraph stands alone, as in progress_bar
        raise
    finally:
        if "bar" in state:
            state["bar"].stop()
