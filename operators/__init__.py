"""Merge operators: pure tensor functions and the registry that names them.

Importing this package registers every operator; `get_operator(name)` finds one.
"""
from .base import (  # noqa: F401
    REGISTRY,
    KernelSpec,
    MergeInputs,
    OperatorSpec,
    ParamSpec,
    get_operator,
    operator_names,
    register,
    tensor_seed,
)

# Each module registers its operators on import.
# (filled in by the operator modules; keep this list in sync)
from . import linear, model_stock, passthrough, sce, slerp, spherical, task_vectors, tsv  # noqa: E402,F401
from .checks import check_params  # noqa: E402,F401
