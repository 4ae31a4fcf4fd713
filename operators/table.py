"""The operator table of the README, generated from the registry so the two never disagree.

`python -m operators.table` prints it.
"""
from __future__ import annotations

from .base import REGISTRY, OperatorSpec, ParamSpec


def _range(p: ParamSpec) -> str:
    if p.kind == "bool":
        return ""
    if p.low is None and p.high is None:
        return ", any finite"
    lo = "-inf" if p.low is None else f"{p.low:g}"
    hi = "inf" if p.high is None else f"{p.high:g}"
    left = "(" if (p.low_open or p.low is None) else "["
    right = ")" if (p.high_open or p.high is None) else "]"
    return f", {left}{lo}, {hi}{right}"


def _param_text(p: ParamSpec) -> str:
    scope = "per model" if p.scope == "model" else "global"
    if p.required:
        default = "required"
    elif p.default is None:
        default = "optional"
    elif p.kind == "bool":
        default = f"default {str(p.default).lower()}"
    else:
        default = f"default {p.default:g}"
    return f"`{p.name}` ({scope}, {default}{_range(p)})"


def _inputs(spec: OperatorSpec) -> str:
    lo, hi = spec.min_models, spec.max_models
    count = f"{lo}" if hi == lo else (f"≥{lo}" if hi is None else f"{lo}–{hi}")
    if spec.needs_base:
        return f"base + {count} other model{'s' if hi != 1 else ''}"
    return f"{count} model{'s' if hi != 1 else ''}"


def _row(spec: OperatorSpec) -> str:
    params = "<br>".join(_param_text(p) for p in spec.params)
    what = f"{spec.summary}. Inputs: {_inputs(spec)}."
    cell = lambda s: s.replace("|", "\\|")  # noqa: E731
    return f"| `{spec.name}` | {cell(params)} | {cell(what)} | {cell(spec.paper)} |"


def operator_table_markdown() -> str:
    """Markdown table: name | parameters | what it computes | reference."""
    specs = {s.name: s for s in REGISTRY.values()}
    lines = [
        "| name | parameters | what it computes | reference |",
        "|---|---|---|---|",
    ]
    lines += [_row(specs[n]) for n in sorted(specs)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import operators  # noqa: F401  (registers everything)

    print(operator_table_markdown(), end="")
