"""Optimizers: Optuna samplers made resumable bit for bit (pycma: search/pycma_sampler.py).

Optuna does not store its samplers' random state; `ReseededSampler` rebuilds the sampler before
every trial from (seed, number of finished trials), so a resumed run asks what an uninterrupted
one would have asked.
"""
from __future__ import annotations

import copy
import hashlib
import io
import pickle
import warnings
from typing import Callable

import optuna
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from mergelab.errors import MergelabError

from .records import RECORD_ATTR
from .pycma_sampler import INTERRUPTED_ATTR, PycmaSampler, popsize_default
from .space import Space

RETRY_ATTR = "mergelab_retry_of"
# a worker's trial created after other workers had already taken the last budget slots: given
# up before evaluation, never counted, never re-tried
ABANDONED_ATTR = "mergelab_abandoned"


# Optuna's CmaEsSampler keeps its optimizer in the study as a pickle (hex, split over trial system
# attributes "<prefix>optimizer:<i>") and unpickles the latest one before each ask. The study lives
# in the run directory, which is untrusted input (people share runs), so before the sampler may
# touch a study every such state is loaded here first by an unpickler that resolves only the few
# globals a CMA-ES state is made of; anything else is refused before Optuna's pickle.loads sees it.
CMA_STATE_GLOBALS = frozenset({
    ("cmaes._cma", "CMA"), ("cmaes._sepcma", "SepCMA"), ("cmaes._cmawm", "CMAwM"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"), ("numpy.core.multiarray", "scalar"),
})


class _CmaStateUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in CMA_STATE_GLOBALS:
            raise _ForeignGlobal(f"{module}.{name}")
        return super().find_class(module, name)


class _ForeignGlobal(Exception):
    pass


class CmaStateGuard:
    """Refuses a study whose stored CMA-ES states hold anything but a CMA-ES state (see above).
    Called before every trial; a state already checked (same trial, same text) is not loaded again."""

    def __init__(self) -> None:
        self._checked: dict[tuple[int, str], str] = {}

    def __call__(self, study: optuna.Study) -> None:
        for t in study.get_trials(deepcopy=False):
            parts: dict[str, dict[int, str]] = {}
            for key, value in t.system_attrs.items():
                head, sep, idx = key.rpartition(":")
                if sep and head.endswith("optimizer") and idx.isdigit():
                    parts.setdefault(head, {})[int(idx)] = value
            for head, chunks in parts.items():
                text = "".join(str(chunks[i]) for i in sorted(chunks))
                if self._checked.get((t.number, head)) == text:
                    continue
                self._check(t.number, head, text)
                self._checked[(t.number, head)] = text

    @staticmethod
    def _check(number: int, head: str, text: str) -> None:
        problem = None
        try:
            _CmaStateUnpickler(io.BytesIO(bytes.fromhex(text))).load()
        except _ForeignGlobal as e:
            problem = f"refers to `{e}`, which no CMA-ES state does"
        except Exception as e:  # noqa: BLE001 - truncated, not hex, not a pickle
            problem = f"is not a readable CMA-ES state ({type(e).__name__})"
        if problem:
            raise MergelabError(
                f"The run's Optuna study holds a CMA-ES optimizer state (trial {number}, "
                f"attribute `{head}`) that {problem}. Optuna would unpickle it to resume, and a "
                "crafted state runs code when unpickled, so mergelab will not continue this run. "
                "If you did not make this run directory yourself, delete it; otherwise start a "
                "new run (or use `optimizer: pycma`, which stores no pickle)."
            )


def cmaes_takes_x0() -> bool:
    """Optuna's CmaEsSampler accepts `x0` (deprecated in 4.9, to be removed in 6.0)."""
    import inspect

    from optuna.samplers import CmaEsSampler

    return "x0" in inspect.signature(CmaEsSampler.__init__).parameters


def derive_seed(seed: int, n: int, salt: str = "") -> int:
    h = hashlib.blake2b(f"{seed}:{n}:{salt}".encode(), digest_size=4).digest()
    return int.from_bytes(h, "little") & 0x7FFFFFFF


def interrupted(t: FrozenTrial) -> bool:
    """Was this trial's process killed before it could finish it? Marked by recovery
    (INTERRUPTED_ATTR), or failed by optuna.storages.fail_stale_trials when its worker's storage
    heartbeat stopped: a FAIL without the record every trial mergelab finishes carries
    (RECORD_ATTR, set before it is told) and not given up for the budget (ABANDONED_ATTR)."""
    if t.user_attrs.get(INTERRUPTED_ATTR, False):
        return True
    return (t.state == TrialState.FAIL and RECORD_ATTR not in t.user_attrs
            and not t.user_attrs.get(ABANDONED_ATTR, False))


def counted(t: FrozenTrial) -> bool:
    """Does this trial count towards the budget? (interrupted ones are re-tried instead)"""
    if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return t.state == TrialState.FAIL and not interrupted(t) and not t.user_attrs.get(ABANDONED_ATTR, False)


def n_counted(study: optuna.Study) -> int:
    return sum(1 for t in study.get_trials(deepcopy=False) if counted(t))


class ReseededSampler(BaseSampler):
    """Delegates to a sampler rebuilt for each trial with a seed derived from (seed, k), where k
    is the number of finished trials when the trial starts, and (CMA-ES) shows the inner sampler
    the trial under number k. After a crash the re-tried trial gets a new Optuna number but the
    same k, so the parameter sequence of finished trials is the uninterrupted one."""

    def __init__(self, factory: Callable[[int], BaseSampler], seed: int,
                 full_space: dict | None = None, renumber: bool = False, shared: bool = False,
                 check_state: Callable[[optuna.Study], None] | None = None):
        self._factory = factory
        self._check_state = check_state  # run on the study before each inner sampler sees it
        # Several workers asking at once see the same k: salt with the (unique) trial number so
        # they do not propose the same candidate. Only for shared runs: a re-tried trial gets a
        # new number, so the salt would break the resume equivalence of a single process.
        self._shared = shared
        # CMA-ES seeds each ask with trial.number; TPE filters trials by number (so it must see
        # the real one): renumber only where the number is used as a seed.
        self._renumber = renumber
        self._seed = seed
        self._full_space = full_space  # returned as the relative space (CMA-ES from trial 0)
        self._inner: dict[int, tuple[BaseSampler, int]] = {}

    def _get(self, study, trial: FrozenTrial) -> tuple[BaseSampler, int]:
        got = self._inner.get(trial.number)
        if got is None:
            if self._check_state is not None:
                self._check_state(study)
            k = n_counted(study)
            salt = f"t{trial.number}" if self._shared else ""
            got = (self._factory(derive_seed(self._seed, k, salt)), k)
            self._inner = {trial.number: got}  # one trial at a time per process
        return got

    def _as_k(self, trial: FrozenTrial, k: int) -> FrozenTrial:
        if not self._renumber:
            return trial
        t = copy.copy(trial)
        t.number = k  # FrozenTrial's public setter, on a copy
        return t

    def infer_relative_search_space(self, study, trial):
        inner, _ = self._get(study, trial)
        if self._full_space is not None:
            return dict(self._full_space)
        return inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        inner, k = self._get(study, trial)
        return inner.sample_relative(study, self._as_k(trial, k), search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        inner, k = self._get(study, trial)
        return inner.sample_independent(study, self._as_k(trial, k), param_name, param_distribution)

    def before_trial(self, study, trial):
        inner, k = self._get(study, trial)
        inner.before_trial(study, trial)

    def after_trial(self, study, trial, state, values):
        inner, _ = self._get(study, trial)
        inner.after_trial(study, trial, state, values)
        self._inner.pop(trial.number, None)

    def reseed_rng(self) -> None:  # the seed is derived per trial; nothing to reseed
        pass


def make_sampler(name: str, space: Space, seed: int, options: dict | None = None,
                 shared: bool = False, x0: dict[str, float] | None = None) -> BaseSampler:
    """The study's sampler for optimizer `name` (pycma: PycmaSampler, its state re-derived from the trials).
    shared: several workers ask from this study at once (seeds salted per trial).
    x0: a warm start (parameter values): the CMA-ES samplers start their mean there (the other
    samplers have no mean; the loop enqueues the warm start as their trial 0)."""
    from optuna.samplers import CmaEsSampler, NSGAIISampler, RandomSampler, TPESampler

    options = options or {}
    n = len(space.params)
    if name == "pycma":
        return PycmaSampler(space, seed, options.get("popsize"), options.get("sigma0"),
                            x0=None if x0 is None else space.to_unit(x0))
    if name == "random":
        return ReseededSampler(lambda s: RandomSampler(seed=s), seed, shared=shared)
    if name == "tpe":
        nst = options.get("n_startup_trials")
        kw = {} if nst is None else {"n_startup_trials": nst}
        return ReseededSampler(lambda s: TPESampler(seed=s, **kw), seed, shared=shared)
    if name == "gp":
        # Gaussian-process Bayesian optimization (Optuna's GPSampler): a surrogate of the score
        # over the whole space, refit on every finished trial; the strongest of these samplers
        # when a trial is expensive and the budget is tens of trials. Reseeded per trial like
        # the others (its fit is a function of the finished trials, so resuming changes nothing).
        from optuna.samplers import GPSampler

        nst = options.get("n_startup_trials")
        kw = {} if nst is None else {"n_startup_trials": nst}
        return ReseededSampler(
            lambda s: GPSampler(seed=s, **kw, independent_sampler=RandomSampler(seed=s),
                                warn_independent_sampling=False),
            seed, shared=shared,
        )
    if name == "nsga2":
        pop = options.get("popsize") or max(4, popsize_default(n))
        return ReseededSampler(lambda s: NSGAIISampler(seed=s, population_size=pop), seed, shared=shared)
    if name == "cmaes":
        pop = options.get("popsize") or popsize_default(n)
        # Optuna's CMA works in [0, 1] per dimension and starts, by default, at the middle with
        # sigma0 = 1/6: the paper's settings. Only a configured sigma0 is passed (the argument
        # is deprecated in Optuna 4.9+ and warns).
        kw = {"sigma0": options["sigma0"]} if options.get("sigma0") else {}
        if x0 is not None and cmaes_takes_x0():
            kw["x0"] = dict(x0)  # the mean starts at the warm start (Optuna < 6; later ones only enqueue)

        def factory(s: int) -> BaseSampler:
            with warnings.catch_warnings():  # said once per trial otherwise; the fallback is above
                warnings.filterwarnings("ignore", message=r"`x0` has been deprecated", category=FutureWarning)
                return CmaEsSampler(
                    **kw, popsize=pop, seed=s, n_startup_trials=0,
                    warn_independent_sampling=False,
                    independent_sampler=RandomSampler(seed=s),
                )

        return ReseededSampler(factory, seed, full_space=space.distributions(), renumber=True, shared=shared,
                               check_state=CmaStateGuard())
    raise MergelabError(f"unknown optimizer `{name}`; use one of cmaes, gp, tpe, random, nsga2, pycma.")
