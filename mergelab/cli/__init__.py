"""The `mergelab` command: a click group whose subcommands live in their own modules.

Subcommands are imported lazily (start-up stays fast) and each module owns its command.
A user error (MergelabError) prints one paragraph and exits non-zero; --debug shows tracebacks.
mergelab draws its own progress bars (cli/progress.py); the bars of libraries it calls
(transformers' "Loading weights", huggingface_hub's downloads) and cma's note that matplotlib
is missing are switched off here, before those libraries are imported.
"""
from __future__ import annotations

import importlib
import os
import sys
import warnings

import click

from ..errors import MergelabError

# command name -> "module:attribute" (a click.Command)
COMMANDS: dict[str, str] = {
    "merge": "mergelab.cli.merge_cmd:merge",
    "eval": "mergelab.cli.eval_cmd:eval_cmd",
    "search": "mergelab.cli.search_cmd:search",
    "resume": "mergelab.cli.search_cmd:resume",
    "runs": "mergelab.cli.search_cmd:runs",
    "show": "mergelab.cli.search_cmd:show",
    "export": "mergelab.cli.search_cmd:export",
    "watch": "mergelab.cli.tui_cmd:watch",
    "tui": "mergelab.cli.tui_cmd:tui",
    "demo": "mergelab.cli.demo_cmd:demo",
    "fuse": "mergelab.cli.fuse_cmd:fuse",
    "push": "mergelab.cli.push_cmd:push",
}


def _available(name: str) -> bool:
    module = COMMANDS[name].split(":")[0]
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


class _LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(n for n in COMMANDS if _available(n))

    def get_command(self, ctx, name):
        if name not in COMMANDS or not _available(name):
            return None
        module, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attr)


CONTEXT = {"help_option_names": ["-h", "--help"]}


def quiet_libraries() -> None:
    """No progress bars or import-time notes from libraries mergelab does not own. A user who set
    HF_HUB_DISABLE_PROGRESS_BARS keeps their choice."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' tqdm follows this flag
    if "huggingface_hub" in sys.modules:  # imported already (tests): the constant was read at import
        from huggingface_hub.utils import disable_progress_bars

        if os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1":
            disable_progress_bars()
    if "transformers" in sys.modules and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1":
        from transformers.utils import logging as tf_logging

        tf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message="Could not import matplotlib.pyplot", category=UserWarning)


@click.group(cls=_LazyGroup, invoke_without_command=True, context_settings=CONTEXT)
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.version_option(package_name="mergelab")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """mergelab: merge language models, search merge recipes, watch and push the results."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug or bool(os.environ.get("MERGELAB_DEBUG"))
    if ctx.invoked_subcommand is None:
        if sys.stdout.isatty() and _available("tui"):
            ctx.invoke(cli.get_command(ctx, "tui"))
        else:
            click.echo(ctx.get_help())


def main(argv: list[str] | None = None) -> int:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:]) or bool(
        os.environ.get("MERGELAB_DEBUG")
    )
    quiet_libraries()
    try:
        cli.main(args=argv, prog_name="mergelab", standalone_mode=False)
    except MergelabError as e:
        if debug:
            raise
        click.echo(f"error: {e}", err=True)
        return e.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    return 0


def run() -> None:  # pragma: no cover - console entry wrapper
    sys.exit(main())
