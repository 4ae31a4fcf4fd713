"""Quick eval: weighted scorers (perplexity, multiple choice, exact match, lm-eval) over LogitModels.

Build an Evaluator once from an EvalSpec and call evaluate() for every candidate model.
"""
from .evaluator import EvalResult, Evaluator, load_data
from .models import HFLogitModel, load_model
from .protocol import LogitModel
from .spec import EvalSpec

__all__ = ["EvalResult", "EvalSpec", "Evaluator", "HFLogitModel", "LogitModel", "load_data", "load_model"]
