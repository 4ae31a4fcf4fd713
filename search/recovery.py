"""A run's files checked against each other before its first trial (resume, a joining worker).

A run directory is shared, copied, edited and damaged; each check here either repairs what the
study still knows (a damaged trials.jsonl), honours an edit the study allows (the budget in
config.yaml), or refuses with what is wrong and how to recover, before any trial runs.

Identity: at creation, resolved.json records the SHA-256 of config.yaml (`config_sha256`) and the
config as given (`given`), and the study records the same hash and the run's creation time as
user attributes. A resolved.json whose hash or time differs from the study's came from another
run; a config.yaml whose hash differs from resolved.json's was edited.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import optuna
from optuna.trial import TrialState

from mergelab.errors import MergelabError

from .config import parse_search_config
from .optimizers import INTERRUPTED_ATTR, RETRY_ATTR, interrupted
from .records import RECORD_ATTR, RecordError, ResolvedRun, TrialRecord
from .rundir import CONFIG_FILE, RESOLVED_FILE, STUDY_FILE, TRIALS_FILE, RunDir
from .storage import TrialIds
from .summary import update_summary

CONFIG_HASH_ATTR = "mergelab_config_sha256"
CREATED_ATTR = "mergelab_created"
EDITABLE = ("budget",)  # config fields a run honours when config.yaml is edited


def config_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def stamp_study(study: optuna.Study, resolved: dict | ResolvedRun) -> None:
    """The identity a later check compares resolved.json against (see module doc)."""
    if isinstance(resolved, dict):  # a run being created: its resolved.json is not written yet
        resolved = ResolvedRun.from_json(resolved)
    study.set_user_attr(CONFIG_HASH_ATTR, resolved.config_sha256)
    study.set_user_attr(CREATED_ATTR, resolved.created)


def check_storage_present(rd: RunDir) -> None:
    """The run's own study.db must exist: opening a missing one would create an empty study and
    the run would start over beside its own trials."""
    stored = rd.resolved_run().storage
    if stored:
        # a shared file storage the run names must exist already: opening it would create a
        # database wherever resolved.json points
        path = stored[len("journal:"):] if stored.startswith("journal:") else (
            stored[len("sqlite:///"):] if stored.startswith("sqlite:///") else None)
        if path is not None and not Path(path).is_file():
            raise MergelabError(
                f"Run {rd.path} names the storage {stored}, which does not exist. mergelab does not "
                f"create a database where a run directory points; check {RESOLVED_FILE} (`storage`), "
                f"or restore that file."
            )
        return
    if not (rd.path / STUDY_FILE).is_file():
        n = len(rd.trials())
        raise MergelabError(
            f"Run {rd.path} has no {STUDY_FILE} (the Optuna study with the optimizer's history; "
            f"trials.jsonl lists {n} trial(s)). Restore {STUDY_FILE} from a copy of the run to resume it, "
            f"or start a new run from its config: `mergelab search {rd.path / CONFIG_FILE} --run NEW`."
        )


def load_study_checked(rd: RunDir, storage, **kw) -> optuna.Study:
    try:
        return optuna.load_study(study_name=rd.study_name(), storage=storage, **kw)
    except KeyError:
        raise MergelabError(
            f"Run {rd.path}: its storage holds no study named {rd.study_name()!r} ({RESOLVED_FILE} "
            f"names it). The study was deleted, or {RESOLVED_FILE} belongs to another run; restore "
            f"the run's own files, or start a new run from `{rd.path / CONFIG_FILE}`."
        ) from None


def check_identity(rd: RunDir, study: optuna.Study, log) -> None:
    """resolved.json belongs to this study; an edited config.yaml is honoured or refused."""
    res = rd.resolved_run()
    attrs = study.user_attrs
    if CONFIG_HASH_ATTR in attrs and (attrs[CONFIG_HASH_ATTR] != res.config_sha256
                                      or attrs.get(CREATED_ATTR) != res.created):
        raise MergelabError(
            f"Run {rd.path}: {RESOLVED_FILE} does not belong to this run's study (it was written for "
            f"another config or run; created {_when(res.created)}, the study's run "
            f"{_when(attrs.get(CREATED_ATTR))}). Resuming would run trials of one search into another's "
            f"study. Restore the run's own {RESOLVED_FILE}, or start a new run from its config."
        )
    text = rd.config_text()
    if res.config_sha256 is None or config_hash(text) == res.config_sha256:
        return
    new = parse_search_config(_yaml(text, rd), f"{rd.path / CONFIG_FILE}").model_dump(mode="json")
    old = res.given or {}
    changed = sorted(k for k in set(new) | set(old) if new.get(k) != old.get(k))
    refused = [k for k in changed if k not in EDITABLE]
    if refused:
        raise MergelabError(
            f"Run {rd.path}: {CONFIG_FILE} was edited after the run was created ({', '.join(refused)} "
            f"changed). A run's models, space, optimizer, seed and eval are fixed by its study: trials "
            f"already run were drawn and scored under the old values. Undo the edit (the values the run "
            f"uses are in {RESOLVED_FILE}), or start a new run from the edited config: `mergelab search "
            f"{rd.path / CONFIG_FILE} --run NEW`. Only `budget` may be edited (or use `mergelab resume "
            f"{rd.path} --trials N`)."
        )
    if changed:  # the budget: honoured
        res = replace(res, budget=new["budget"], given=new, config_sha256=config_hash(text))
        rd.write_resolved(res)
        rd.update_summary(lambda s: s.update(budget=new["budget"]))
        stamp_study(study, res)
        log(f"{CONFIG_FILE} edited: budget now {new['budget']} (honoured)")


def set_budget_trials(rd: RunDir, trials: int) -> None:
    """`mergelab resume --trials N`: the run's trial budget becomes N."""
    done = rd.run_summary().trials_done
    if trials <= done:
        raise MergelabError(
            f"--trials {trials}: run {rd.path} has already counted {done} trials; give a larger budget."
        )
    res = rd.resolved_run()
    res = replace(res, budget={**res.budget, "trials": trials})
    rd.write_resolved(res)
    rd.update_summary(lambda s: s.update(budget=res.budget))


def repair_trials(rd: RunDir, log) -> bool:
    """Drop lines of trials.jsonl that do not parse (a half-written last line, an edit) and
    duplicate trial numbers, keeping the original beside it; True when something was repaired.
    The study holds every finished trial's record, so the loop restores the dropped ones."""
    p = rd.path / TRIALS_FILE
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        return False
    good, bad, seen = [], 0, set()
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            n = TrialRecord.from_json(json.loads(line)).number
        except (json.JSONDecodeError, UnicodeDecodeError, RecordError):
            n = None
        if not isinstance(n, int) or n in seen:
            bad += 1
            continue
        seen.add(n)
        good.append(line)
    if not bad and (not data or data.endswith(b"\n")):
        return False
    keep = p.with_name(f"{TRIALS_FILE}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(p, keep)
    with rd.locked():
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            os.write(fd, b"".join(line + b"\n" for line in good))
            os.fsync(fd)
        finally:
            os.close(fd)
    log(f"{TRIALS_FILE} was damaged ({bad} unreadable or repeated line(s)); the original is kept as "
        f"{keep.name}, the readable lines kept, and the missing trials are restored from the study", "WARNING")
    return True


def _yaml(text: str, rd: RunDir) -> dict:
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise MergelabError(f"Run {rd.path}: {CONFIG_FILE} is not valid YAML ({e}); undo the edit.") from None
    if not isinstance(data, dict):
        raise MergelabError(f"Run {rd.path}: {CONFIG_FILE} is not a mapping; undo the edit.")
    return data


def _when(t) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if isinstance(t, (int, float)) else "unknown"



# -- trials an earlier (or another) process left unfinished ---------------------------------------
def _interrupted_record(t: optuna.trial.FrozenTrial) -> dict:
    return {"number": t.number, "state": "FAIL", "params": t.params, "recipe": None, "value": None,
            "values": None, "metrics": {}, "scores": {}, "error": "interrupted: the search process died",
            "interrupted": True, "retry_of": t.user_attrs.get(RETRY_ATTR), "timings": {},
            "started": t.datetime_start.timestamp() if t.datetime_start else None,
            "finished": time.time(), "device": t.user_attrs.get("device"), "worker": t.user_attrs.get("worker")}


def mark_interrupted(study: optuna.Study, ids: TrialIds, rd: RunDir,
                     alive: Callable[[optuna.trial.FrozenTrial], bool], log: Callable[[str], None],
                     retry: bool, n_params: int) -> None:
    """RUNNING trials whose process is gone -> FAIL (interrupted); every interrupted trial
    (these, and those optuna.storages.fail_stale_trials failed) gets its trials.jsonl line once;
    then every interrupted trial has a re-try queued. Idempotent, so a crash here is harmless.
    `ids` maps trial numbers to the storage's trial ids (public storage methods only)."""
    storage = ids.storage
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if alive(t) and not t.user_attrs.get(INTERRUPTED_ATTR):
            continue
        try:
            tid = ids(t.number)
            storage.set_trial_user_attr(tid, INTERRUPTED_ATTR, True)
            storage.set_trial_state_values(tid, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker got there first (or it just finished)
    have = {r.number for r in rd.trial_records()}
    trials = study.get_trials(deepcopy=False)
    for t in trials:
        if t.state == TrialState.FAIL and interrupted(t) and t.number not in have:
            if rd.append_trial_once(_interrupted_record(t)):
                log(f"trial {t.number} was running when its process died: marked failed, will be re-tried")
    if not retry:
        return
    retried = {t.user_attrs.get(RETRY_ATTR) for t in trials}
    for t in trials:
        # Only a trial that had drawn every parameter is re-tried with them: one killed inside
        # suggest_* holds some of them, and fixing those would shift the sampler's random draws
        # for the rest. The samplers are reseeded from the count of finished trials, so the next
        # ask draws the same point again anyway.
        if (t.state == TrialState.FAIL and interrupted(t) and t.number not in retried
                and t.params and len(t.params) == n_params):
            study.enqueue_trial(t.params, user_attrs={RETRY_ATTR: t.number}, skip_if_exists=False)


def n_counted_records(rd: RunDir) -> int:
    """The trials.jsonl lines that count towards the budget (interrupted ones do not)."""
    return sum(1 for r in rd.trial_records() if r.counted)


def reconcile_jsonl(study: optuna.Study, rd: RunDir, log) -> None:
    """A trial told to the storage whose line never reached trials.jsonl (killed in between)."""
    have = {r.number for r in rd.trial_records()}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)):
        if t.number in have:
            continue
        raw = t.user_attrs.get(RECORD_ATTR)
        if raw is None:
            continue
        try:
            rec = TrialRecord.from_json(json.loads(raw)).to_json()
        except (json.JSONDecodeError, TypeError, RecordError) as e:
            log(f"trial {t.number}: its record in the study is not readable ({e}); left out of trials.jsonl",
                "WARNING")
            continue
        rd.append_trial(rec)
        update_summary(rd, rec, log)
        log(f"trial {t.number}: restored its trials.jsonl line from the study")
