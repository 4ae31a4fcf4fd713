"""User-facing errors: one paragraph each, what is wrong, where, and what to do."""
from __future__ import annotations


class MergelabError(Exception):
    """An error the user can cause and fix. The CLI prints its message without a traceback."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()) if "\n\n" not in message else message)


def name_list(items, limit: int = 10) -> str:
    """'a, b, c' with at most `limit` named and a count of the rest."""
    items = list(items)
    shown = ", ".join(str(i) for i in items[:limit])
    if len(items) > limit:
        shown += f" and {len(items) - limit} more"
    return shown


def pydantic_problems(e, limit: int = 5) -> str:
    """A pydantic ValidationError as 'unknown field `a.b`; `c[0].d`: reason' (field paths as
    the YAML spells them)."""
    parts = []
    for err in e.errors()[:limit]:
        loc = ""
        for part in err["loc"]:
            loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown field `{loc}`")
        elif err["type"] == "missing":
            parts.append(f"missing field `{loc}`")
        else:
            parts.append(f"`{loc}`: {err['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


class NonFiniteMergeError(MergelabError):
    """A merged tensor holds inf or NaN. `tensor` names it, `params` are its resolved parameters;
    the trial merger raises it for a candidate (the search records a failed trial with the
    message), the disk merge stops before anything looks complete."""

    def __init__(self, tensor: str, count: int | None, params: dict, where: str):
        self.tensor, self.count, self.params = tensor, count, params
        what = f"{count} inf/NaN values" if count is not None else "inf or NaN values"
        super().__init__(
            f"The merged tensor `{tensor}` holds {what} ({where}); its parameters were {params}. "
            "A source checkpoint holds inf/NaN there, or the weights/lambda make the result "
            "overflow the output dtype. Check the sources (and lower the weights or lambda, or use "
            "a wider out_dtype) and run again."
        )
