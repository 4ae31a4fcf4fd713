"""Starting and resuming searches from the UI as detached processes running the usual commands.

A search started here runs `python -m mergelab resume RUN` in its own session, so it outlives the
UI; every viewer then sees it as running through the run directory's worker heartbeat.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from search.rundir import RunDir

from ..errors import MergelabError

# stdout/stderr of a search process started from the UI. Not log.txt: the command echoes every
# line it logs, so sending its output there would write each line twice.
PROCESS_LOG = "process.log"
STAGING_SUFFIX = ".search.yml"  # create_run's config, beside the run for the moment prepare_run reads it


def resume_command(run_path: str | Path, more_trials: int | None = None) -> list[str]:
    """The argv of `mergelab resume RUN [--trials N]` (plain log lines: the process has no
    terminal); `--trials N` gives the run N more trials than it has done."""
    extra = ["--trials", str(int(more_trials))] if more_trials is not None else []
    return [sys.executable, "-m", "mergelab", "resume", str(run_path), *extra, "--no-tui"]


def start_detached(cmd: list[str], run_path: str | Path, *, cwd: str | Path | None = None) -> subprocess.Popen:
    """Run cmd in a new session (it survives the UI and its Ctrl-C), output to RUN/process.log."""
    run_path = Path(run_path)
    log_path = run_path / PROCESS_LOG
    with open(log_path, "ab") as log:
        log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n".encode())
        log.flush()
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, close_fds=True, cwd=str(cwd or os.getcwd()))


def resume_in_background(rd: RunDir) -> subprocess.Popen:
    """Continue a stopped or failed run in a background `mergelab resume` process."""
    st = rd.status()
    if st.status == "running":
        raise MergelabError(
            f"{st.name} is already running (worker {', '.join(st.live_workers) or '?'}); open it with "
            "Enter to watch it."
        )
    if st.status == "finished":
        raise MergelabError(
            f"{st.name} has finished ({st.detail or 'budget met'}); there is nothing to resume. Press + "
            "to give it more trials (`mergelab resume RUN --trials N`), or n to start a new search."
        )
    return start_detached(resume_command(rd.path), rd.path)


def more_trials_in_background(rd: RunDir, n: int) -> subprocess.Popen:
    """Give a run that is not running N more trials: `mergelab resume RUN --trials N` in the
    background (the command line's own path, so the budget is raised exactly as it does)."""
    st = rd.status()
    if st.status == "running":
        raise MergelabError(
            f"{st.name} is running (worker {', '.join(st.live_workers) or '?'}); give it more trials once it "
            "has stopped or finished."
        )
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise MergelabError(f"More trials: {n!r} is not a number of trials; give a whole number of 1 or more.")
    return start_detached(resume_command(rd.path, more_trials=n), rd.path)


def legacy_side_files(run_path: str | Path) -> list[Path]:
    """Files named after a run beside its directory instead of inside it: the warm start an older
    `mergelab demo` kept there (runs/.NAME.warm_start.yml) and the config create_run stages for a
    moment (runs/.NAME.search.yml, left only by a process killed in that moment). Deleting the run
    deletes them too; a link of that name is left alone (it is no file of the run)."""
    p = Path(run_path)
    sides = [p.parent / f".{p.name}.warm_start.yml", p.parent / f".{p.name}{STAGING_SUFFIX}"]
    return [s for s in sides if s.is_file() and not s.is_symlink()]


def create_run(config_text: str, run_path: str | Path) -> RunDir:
    """Validate a search config and create its run directory exactly as `mergelab search` does
    (search.loop.prepare_run); the run's config.yaml is config_text, byte for byte."""
    from search.loop import prepare_run

    run_path = Path(run_path)
    run_path.parent.mkdir(parents=True, exist_ok=True)
    # prepare_run reads a file and refuses a non-empty run directory, so the text is staged beside it
    staging = run_path.parent / f".{run_path.name}{STAGING_SUFFIX}"
    staging.write_text(config_text, encoding="utf-8")
    try:
        return prepare_run(staging, run_path)
    finally:
        staging.unlink(missing_ok=True)


def process_log_tail(run_path: str | Path, lines: int = 3) -> str:
    """The last lines a background search printed (shown when it exits with an error)."""
    p = Path(run_path) / PROCESS_LOG
    if not p.is_file():
        return ""
    text = p.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    return "\n".join(text[-lines:])
