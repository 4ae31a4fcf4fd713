"""Checks that involve several parameters at once, which a single ParamSpec range cannot say.

The plan runs `check_params` on each tensor's resolved parameters before any merging; the
operators run it too, as a last guard, and raise MergelabError with the same text.
"""
from __future__ import annotations

from typing import Any, Callable

from mergelab.errors import MergelabError

# (model_params, params, base_index) -> None when fine, else the reason, one sentence.
Check = Callable[[list[dict[str, Any]], dict[str, Any], "int | None"], "str | None"]

CHECKS: dict[str, Check] = {}


def add_check(operator: str, check: Check) -> None:
    CHECKS[operator] = check


def check_params(
    operator: str,
    model_params: list[dict[str, Any]],
    params: dict[str, Any],
    base_index: int | None = None,
) -> str | None:
    """None when the resolved parameters of one tensor are consistent, else the reason."""
    check = CHECKS.get(operator)
    return None if check is None else check(model_params, params, base_index)


def raise_if_invalid(operator: str, tensor: str, model_params, params, base_index) -> None:
    problem = check_params(operator, model_params, params, base_index)
    if problem is not None:
        raise MergelabError(
            f"Recipe parameters of merge_method {operator!r} do not fit together at tensor "
            f"{tensor!r}: {problem} Change the values in the recipe's parameters (or the "
            f"gradient or filter that produces them for this tensor) and run again."
        )
