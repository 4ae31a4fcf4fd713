"""The lm_eval scorer: lm-evaluation-harness tasks scored through our LogitModel, offline.

lm-eval never loads a model here: its LM interface is implemented on top of LogitModel, and a
task can be a local YAML with local JSONL data (`dataset_path: json`, `dataset_kwargs.data_files`).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
import yaml

from ..errors import MergelabError
from .data import subset
from .scorers import (
    HIGHER,
    LOWER,
    Scorer,
    continuation_logprobs,
    encode,
    make_batch,
    max_length_of,
    pad_id_of,
    prefix_id_of,
    split_continuation,
)
from .spec import LmEvalScorerSpec


def _import_lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.api.model import LM
        from lm_eval.evaluator import evaluate
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise MergelabError(
            f"A scorer of type lm_eval needs lm-evaluation-harness, which is not importable here "
            f"({e}). Install it with `pip install 'mergelab[lmeval]'` (or `pip install lm-eval`)."
        ) from e
    return LM, evaluate, TaskManager


class _TagTolerantLoader(yaml.SafeLoader):
    """Reads a task YAML for its `task:` name while ignoring lm-eval tags such as !function."""


_TagTolerantLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


@contextlib.contextmanager
def _working_dir(path: Path):
    # `datasets` resolves relative data_files against the working directory; task YAMLs are
    # written relative to themselves, so load them from their own folder.
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def load_tasks(spec: LmEvalScorerSpec) -> dict:
    """Load the task(s) and their data once (lm-eval's TaskManager.load result)."""
    _, _, TaskManager = _import_lm_eval()
    include: list[str] = []
    if spec.include_path is not None:
        if not spec.include_path.is_dir():
            raise MergelabError(f"Scorer '{spec.name}': include_path {spec.include_path} is not a directory.")
        include.append(str(spec.include_path))
    if spec.task_yaml is not None:
        if not spec.task_yaml.is_file():
            raise MergelabError(
                f"Scorer '{spec.name}': task_yaml {spec.task_yaml} does not exist. Paths in an eval "
                "spec are relative to the spec's folder."
            )
        try:
            raw = yaml.load(spec.task_yaml.read_text(encoding="utf-8"), Loader=_TagTolerantLoader)
        except yaml.YAMLError as e:
            raise MergelabError(f"Scorer '{spec.name}': {spec.task_yaml} is not valid YAML: {e}") from e
        if not isinstance(raw, dict) or not isinstance(raw.get("task"), str):
            raise MergelabError(
                f"Scorer '{spec.name}': {spec.task_yaml} has no `task:` name; an lm-eval task YAML "
                "starts with `task: <name>` (see lm-eval's docs/task_guide.md)."
            )
        task_name, home = raw["task"], spec.task_yaml.parent
        include.insert(0, str(home))
    else:
        task_name, home = spec.task, spec.include_path or Path.cwd()
    # Indexing lm-eval's thousands of built-in task YAMLs takes seconds; skip it when the task is
    # local. Built-in tasks (no include_path, no task_yaml) need the Hub, i.e. a network.
    manager = TaskManager(include_path=include or None, include_defaults=not include)
    if task_name not in manager.all_tasks:
        raise MergelabError(
            f"Scorer '{spec.name}': lm-eval knows no task '{task_name}'"
            + (f" in {', '.join(include)}" if include else "")
            + ". Check the task name (the `task:` field of its YAML) and include_path."
        )
    try:
        with _working_dir(home):
            loaded = manager.load([task_name])
    except Exception as e:  # lm-eval and datasets raise many types; all mean "cannot load the task"
        raise MergelabError(
            f"Scorer '{spec.name}': lm-eval could not load task '{task_name}': {type(e).__name__}: {e}. "
            "For offline use, define the task in a local YAML with `dataset_path: json` and "
            "`dataset_kwargs: {data_files: {test: your.jsonl}}`."
        ) from e
    for name, task in loaded["tasks"].items():
        if len(task.eval_docs) == 0:
            raise MergelabError(f"Scorer '{spec.name}': task '{name}' has no documents to evaluate.")
    return loaded


def _adapter_class():
    LM, _, _ = _import_lm_eval()

    class MergelabLM(LM):
        """lm-eval's LM interface over a LogitModel; token ids are cached across candidates."""

        def __init__(self, tokenizer, batch_size: int, max_length: int, chat: bool):
            super().__init__()
            self.tokenizer = tokenizer
            self.model = None  # set per evaluation
            self.batch_size = batch_size
            self.max_length = max_length
            self.special = not chat  # a chat template writes its own special tokens
            self.pad = pad_id_of(tokenizer)
            self.prefix = prefix_id_of(tokenizer)
            self._cache: dict[tuple, tuple[list[int], int]] = {}

        def _model_device(self):
            return self.model.device

        def _pair(self, context: str, continuation: str) -> tuple[list[int], int]:
            key = ("ll", context, continuation)
            if key not in self._cache:
                if context == "":
                    ctx = [self.prefix] if self.prefix is not None else []
                    cont = encode(self.tokenizer, continuation, False)
                else:
                    ctx, cont = split_continuation(self.tokenizer, context, continuation, self.special)
                seq = (ctx + cont)[-self.max_length:]
                self._cache[key] = (seq, min(len(cont), len(seq) - 1))
            return self._cache[key]

        def _score(self, rows: list[tuple[list[int], int]], greedy: bool):
            sums, flags = [], []
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start: start + self.batch_size]
                batch = make_batch([r[0] for r in chunk], [r[1] for r in chunk],
                                   [len(r[0]) - r[1] for r in chunk], self.pad, self._model_device())
                s, g = continuation_logprobs(self.model, batch, greedy=greedy)
                sums.extend(float(x) for x in s)
                if greedy:
                    flags.extend(bool(x) for x in g)
            return sums, flags

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            rows = [self._pair(*req.args) for req in requests]
            sums, flags = self._score(rows, greedy=True)
            return list(zip(sums, flags))

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            out = []
            for req in requests:
                (text,) = req.args[:1]
                key = ("roll", text)
                if key not in self._cache:
                    tokens = ([self.prefix] if self.prefix is not None else []) + encode(self.tokenizer, text, False)
                    windows, start = [], 1
                    while start < len(tokens):
                        end = min(start + self.max_length - 1, len(tokens))
                        windows.append((tokens[max(0, end - self.max_length): end], end - start))
                        start = end
                    self._cache[key] = windows
                sums, _ = self._score(self._cache[key], greedy=False) if self._cache[key] else ([], [])
                out.append(float(sum(sums)))
            return out

        def generate_until(self, requests, disable_tqdm: bool = False):
            results: list[str | None] = [None] * len(requests)
            groups: dict[tuple, list[int]] = {}
            for i, req in enumerate(requests):
                kwargs = dict(req.args[1]) if len(req.args) > 1 and req.args[1] else {}
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                groups.setdefault((tuple(until), int(kwargs.get("max_gen_toks", 256))), []).append(i)
            for (until, max_new), indices in groups.items():
                def stop(tokens, until=until):
                    text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                    return any(u in text for u in until)

                for start in range(0, len(indices), self.batch_size):
                    chunk = indices[start: start + self.batch_size]
                    seqs = []
                    for i in chunk:
                        key = ("gen", requests[i].args[0])
                        if key not in self._cache:
                            ids = encode(self.tokenizer, requests[i].args[0], self.special)
                            self._cache[key] = ids[-max(1, self.max_length - max_new):]
                        seqs.append(self._cache[key])
                    batch = make_batch(seqs, [0] * len(seqs), [len(s) for s in seqs], self.pad, self._model_device())
                    outs = self.model.generate_greedy(
                        batch.ids, batch.mask, max_new, eos_token_id=self.tokenizer.eos_token_id,
                        stop=stop if until else None,
                    )
                    for i, new in zip(chunk, outs):
                        text = self.tokenizer.decode(new, skip_special_tokens=True)
                        cut = min((p for p in (text.find(u) for u in until) if p >= 0), default=-1)
                        results[i] = text[:cut] if cut >= 0 else text
            return results

        def apply_chat_template(self, chat_history, add_generation_prompt=True) -> str:
            return self.tokenizer.apply_chat_template(
                chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
            )

        @property
        def tokenizer_name(self) -> str:
            return str(getattr(self.tokenizer, "name_or_path", "tokenizer")).replace("/", "__")

        def chat_template(self, chat_template=False):
            return getattr(self.tokenizer, "chat_template", None) or ""

    return MergelabLM


class LmEvalScorer(Scorer):
    """One lm_eval scorer; reports once, at the end (lm-eval computes metrics only then)."""

    def __init__(self, spec: LmEvalScorerSpec, tokenizer, device, batch_size: int, items=None):
        self.name, self.weight, self.spec = spec.name, spec.weight, spec
        if spec.chat_template and not getattr(tokenizer, "chat_template", None):
            raise MergelabError(
                f"Scorer '{spec.name}' sets chat_template: true, but this model's tokenizer has no "
                "chat template. Set chat_template: false, or use a model whose tokenizer defines one."
            )
        self.loaded = items if items is not None else load_tasks(spec)
        _, self._evaluate, _ = _import_lm_eval()
        self.samples = {
            name: sorted(subset(len(task.eval_docs), spec.limit, spec.seed))
            for name, task in self.loaded["tasks"].items()
        }
        self.n_items = sum(len(v) for v in self.samples.values())
        self.lm = _adapter_class()(tokenizer, batch_size, max_length_of(tokenizer, spec.max_length), spec.chat_template)
        self.directions: dict[str, str] = {}
        self.score_definition = spec.metric or "the task's first metric"

    def _metric_key(self, task: str, metric: str) -> str:
        single = len(self.loaded["tasks"]) == 1
        return f"{self.name}/{metric}" if single else f"{self.name}/{task}/{metric}"

    def run(self, model, report):
        self.lm.model = model
        with torch.inference_mode():
            out = self._evaluate(
                lm=self.lm, task_dict=self.loaded, samples=self.samples, bootstrap_iters=0,
                log_samples=False, apply_chat_template=self.spec.chat_template,
            )
        metrics, directions, per_task = {}, {}, {}
        for task in self.loaded["tasks"]:
            higher = out.get("higher_is_better", {}).get(task, {})
            for key, value in out["results"].get(task, {}).items():
                if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                    continue
                metric, filt = key.split(",", 1)
                label = metric if filt == "none" else f"{metric}_{filt}"
                full = self._metric_key(task, label)
                metrics[full] = float(value)
                directions[full] = HIGHER if higher.get(metric, True) else LOWER
                per_task.setdefault(task, {})[metric] = (float(value), higher.get(metric, True))
        chosen = self.spec.metric
        if chosen is None:
            first_task = next(iter(per_task), None)
            if first_task is None or not per_task[first_task]:
                raise MergelabError(f"Scorer '{self.name}': lm-eval returned no metrics for its task(s).")
            chosen = next(iter(per_task[first_task]))
        values = []
        for task, ms in per_task.items():
            if chosen not in ms:
                raise MergelabError(
                    f"Scorer '{self.name}': metric '{chosen}' is not reported by task '{task}'; it "
                    f"reports {', '.join(ms)}. Set `metric:` to one of those."
                )
            value, higher = ms[chosen]
            values.append(value if higher else -value)
        score = sum(values) / len(values)
        self.directions = directions
        self.score_definition = chosen if per_task[next(iter(per_task))][chosen][1] else f"-{chosen}"
        if report is not None:
            report(self.name, 1, score)
        return metrics, score
