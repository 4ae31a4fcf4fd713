"""The eval spec: which scorers run on which data, with what weight (YAML or a search config).

Everything here is validated before any model work; data paths are relative to the YAML's folder.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from ..errors import MergelabError, name_list

# type -> what the score is (higher is better for every combined score)
SCORER_TYPES: dict[str, str] = {
    "perplexity": "perplexity and mean NLL per token on text; score = -NLL",
    "multiple_choice": "accuracy of the most likely choice; score = accuracy",
    "exact_match": "accuracy of greedy generations against answers (mode forced: in one pass); score = accuracy or answer_prob",
    "lm_eval": "an lm-evaluation-harness task; score = its metric (negated if lower is better)",
}


def _resolve(value: Path | None, info: ValidationInfo) -> Path | None:
    if value is None:
        return None
    base = (info.context or {}).get("base_dir")
    value = Path(value).expanduser()
    if not value.is_absolute() and base is not None:
        value = Path(base) / value
    # Absolute, because lm-eval tasks are loaded from their own folder (see lmeval._working_dir).
    return value.absolute()


class _ScorerBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # The name becomes the prefix of metric keys ("name/accuracy"), so no slashes or spaces.
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    weight: float = 1.0
    limit: int | None = Field(default=None, ge=1)
    seed: int = 0
    batch_size: int | None = Field(default=None, ge=1)


class _DataScorer(_ScorerBase):
    data: Path

    @field_validator("data")
    @classmethod
    def _data_path(cls, v, info: ValidationInfo):
        return _resolve(v, info)


class PerplexityScorerSpec(_DataScorer):
    """Text file (documents: paragraphs, lines or the whole file) or JSONL with a text field."""

    type: Literal["perplexity"]
    field: str = "text"
    # How a plain text file is cut into documents (the items `limit` picks from).
    split: Literal["paragraphs", "lines", "none"] = "paragraphs"
    max_length: int | None = Field(default=None, ge=2)


class MultipleChoiceScorerSpec(_DataScorer):
    """JSONL {prompt, choices, answer}; answer is an index or the text of a choice."""

    type: Literal["multiple_choice"]
    normalize: Literal["length", "none"] = "none"
    chat_template: bool = False


class ExactMatchScorerSpec(_DataScorer):
    """JSONL {prompt, answer}; greedy generation, cut at stop strings, optional regex extraction.

    mode "forced" scores the same question in one forward pass instead of a generation loop: an
    item is correct when `target_delimiter + answer + terminator` (the first stop string, else the
    end-of-text token) is the model's greedy choice at every token, i.e. when greedy decoding
    would write exactly that. It also measures the probability of that text (answer_prob), a
    smooth signal that `score: answer_prob` makes the scorer's score.
    """

    type: Literal["exact_match"]
    max_new_tokens: int = Field(default=32, ge=1)
    stop: list[str] = Field(default_factory=list)
    extract_regex: str | None = None
    strip: bool = True
    chat_template: bool = False
    mode: Literal["generate", "forced"] = "generate"
    target_delimiter: str = " "
    score: Literal["accuracy", "answer_prob"] = "accuracy"

    @model_validator(mode="after")
    def _forced_fits(self):
        if self.mode == "forced" and self.extract_regex is not None:
            raise ValueError(
                "mode: forced scores the whole answer text token by token, so extract_regex cannot "
                "apply; remove extract_regex or use mode: generate"
            )
        if self.score == "answer_prob" and self.mode != "forced":
            raise ValueError(
                "score: answer_prob needs mode: forced (the probability of the answer is measured "
                "in the forced pass); set mode: forced or use score: accuracy"
            )
        return self

    @field_validator("stop")
    @classmethod
    def _stops_not_empty(cls, v):
        if any(s == "" for s in v):
            raise ValueError("stop strings must not be empty (an empty string would stop at once)")
        return v

    @field_validator("extract_regex")
    @classmethod
    def _regex_compiles(cls, v):
        if v is not None:
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"not a valid Python regular expression: {e}") from e
        return v


class LmEvalScorerSpec(_ScorerBase):
    """An lm-evaluation-harness task, by name (with include_path) or by a local task YAML."""

    type: Literal["lm_eval"]
    task: str | None = None
    task_yaml: Path | None = None
    include_path: Path | None = None
    metric: str | None = None
    max_length: int | None = Field(default=None, ge=2)
    chat_template: bool = False

    @field_validator("task_yaml", "include_path")
    @classmethod
    def _paths(cls, v, info: ValidationInfo):
        return _resolve(v, info)

    @model_validator(mode="after")
    def _one_task(self):
        if (self.task is None) == (self.task_yaml is None):
            raise ValueError(
                "give exactly one of `task` (a task name, found in include_path or lm-eval's "
                "built-in tasks) or `task_yaml` (a local task YAML file)"
            )
        return self


ScorerSpec = Annotated[
    Union[PerplexityScorerSpec, MultipleChoiceScorerSpec, ExactMatchScorerSpec, LmEvalScorerSpec],
    Field(discriminator="type"),
]


class EvalSpec(BaseModel):
    """A list of weighted scorers; the combined score is the weighted sum of their scores."""

    model_config = ConfigDict(extra="forbid")

    scorers: list[ScorerSpec] = Field(min_length=1)
    batch_size: int = Field(default=16, ge=1)
    # How the scorers' scores become the one combined score (a search's fitness):
    # sum: sum of weight x score. geometric: exp(sum w log score / sum w), the weighted geometric
    # mean of scores in [0, 1] (accuracies, answer probabilities): a skill near zero pulls the
    # whole score toward zero, so a search keeps every skill instead of trading one away.
    combine: Literal["sum", "geometric"] = "sum"

    @model_validator(mode="after")
    def _unique_names(self):
        seen: set[str] = set()
        for s in self.scorers:
            if s.name in seen:
                raise ValueError(f"scorer name '{s.name}' is used twice; names must be unique")
            seen.add(s.name)
        return self

    @model_validator(mode="after")
    def _geometric_needs_fractions(self):
        if self.combine != "geometric":
            return self
        for s in self.scorers:
            if isinstance(s, PerplexityScorerSpec):
                raise ValueError(
                    f"combine: geometric takes the geometric mean of scores in [0, 1], but scorer "
                    f"'{s.name}' is a perplexity scorer (its score is -NLL, below 0); use combine: sum "
                    "or drop that scorer"
                )
            if s.weight <= 0:
                raise ValueError(
                    f"combine: geometric needs positive weights (each is an exponent); scorer "
                    f"'{s.name}' has weight {s.weight}"
                )
        return self

    @classmethod
    def load(cls, path: str | Path) -> "EvalSpec":
        """Read an eval spec YAML; relative data paths are taken from the YAML's folder."""
        path = Path(path)
        if not path.is_file():
            raise MergelabError(
                f"Eval spec {path} does not exist. Give the path of a YAML file with a `scorers:` "
                "list (see the README's eval section)."
            )
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise MergelabError(f"Eval spec {path} is not valid YAML: {e}") from e
        return cls.from_dict(raw, base_dir=path.parent, source=str(path))

    @classmethod
    def from_dict(cls, raw: Any, base_dir: str | Path = ".", source: str = "eval spec") -> "EvalSpec":
        """Validate an already-parsed spec (e.g. the `eval:` block of a search config)."""
        if not isinstance(raw, dict) or not isinstance(raw.get("scorers"), list):
            raise MergelabError(
                f"{source}: an eval spec is a mapping with a `scorers:` list, e.g. "
                "`scorers: [{name: addition, type: exact_match, data: addition.jsonl}]`."
            )
        for i, s in enumerate(raw["scorers"]):
            where = f"{source}: scorers[{i}]"
            if not isinstance(s, dict):
                raise MergelabError(f"{where} is not a mapping; each scorer is a mapping with name, type and data.")
            kind = s.get("type")
            if kind not in SCORER_TYPES:
                label = f" ({s['name']})" if isinstance(s.get("name"), str) else ""
                got = "has no `type`" if kind is None else f"has unknown type '{kind}'"
                raise MergelabError(
                    f"{where}{label} {got}. Known scorer types: {name_list(SCORER_TYPES)}."
                )
        try:
            return cls.model_validate(raw, context={"base_dir": Path(base_dir)})
        except ValidationError as e:
            raise MergelabError(_format_validation(e, raw, source)) from None

    def with_limit(self, limit: int | None) -> "EvalSpec":
        """The same spec with every scorer's limit replaced (the CLI's --limit)."""
        if limit is None:
            return self
        if limit < 1:
            raise MergelabError(f"--limit must be at least 1, got {limit}.")
        return self.model_copy(
            update={"scorers": [s.model_copy(update={"limit": limit}) for s in self.scorers]}
        )


def _format_validation(e: ValidationError, raw: dict, source: str) -> str:
    lines = []
    for err in e.errors():
        loc = list(err["loc"])
        where = ""
        if len(loc) >= 2 and loc[0] == "scorers" and isinstance(loc[1], int):
            i = loc[1]
            name = raw["scorers"][i].get("name") if isinstance(raw["scorers"][i], dict) else None
            # The discriminated union puts the type tag in the location; users never wrote it.
            rest = [str(p) for p in loc[3:]] if len(loc) > 2 and loc[2] in SCORER_TYPES else [str(p) for p in loc[2:]]
            where = f"scorers[{i}]" + (f" ({name})" if name else "") + ("." + ".".join(rest) if rest else "")
        else:
            where = ".".join(str(p) for p in loc) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown option for this scorer type (check the spelling; see the README's eval section)"
        lines.append(f"{where}: {msg}")
    return f"{source} is not a valid eval spec:\n\n" + "\n".join(f"  - {l}" for l in lines)
