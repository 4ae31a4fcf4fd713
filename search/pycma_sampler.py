"""pycma as an Optuna sampler whose state is re-derived from the study's trials.

Nothing of pycma is stored: the run directory holds no pickle (a crafted one would run code on
resume). Each trial carries its place in the evolution as the user attribute ``pycma_slot``
[generation, slot]; the sampler replays the run from a fresh ``CMAEvolutionStrategy``: ask
generation 0 (np.random reseeded from (seed, generation)), tell it the finished slots' losses,
ask generation 1, ... That is exactly the sequence of calls an uninterrupted run makes, so the
rebuilt strategy is the uninterrupted one, whatever moment a kill happened at.

A slot's loss is -value for a COMPLETE trial and "worst" for a PRUNED or failed one; a trial
interrupted by a dead process leaves its slot open, and the next trial evaluates that slot.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import optuna
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from mergelab.errors import MergelabError

from .space import Space

SLOT_ATTR = "pycma_slot"
INTERRUPTED_ATTR = "mergelab_interrupted"  # the same name as optimizers.INTERRUPTED_ATTR


def popsize_default(n: int) -> int:
    """The evolutionary-merging paper's population: 4 + floor(3 ln n)."""
    return 4 + int(np.floor(3 * np.log(max(1, n))))


def _seed(seed: int, n: int, salt: str) -> int:
    import hashlib

    h = hashlib.blake2b(f"{seed}:{n}:{salt}".encode(), digest_size=4).digest()
    return int.from_bytes(h, "little") & 0x7FFFFFFF


@dataclass
class Generation:
    """The asked generation: its points (unit cube) and the losses told so far by slot."""

    number: int
    solutions: list[np.ndarray]
    losses: dict[int, float] = field(default_factory=dict)


class PycmaSampler(BaseSampler):
    """Every parameter sampled together from pycma's current generation (see module doc)."""

    def __init__(self, space: Space, seed: int, popsize: int | None = None, sigma0: float | None = None,
                 x0: list[float] | None = None):
        self._space = space
        # a warm start (unit cube): the evolution's first mean, and generation 0's slot 0 exactly
        self._x0 = None if x0 is None else [min(1.0, max(0.0, float(u))) for u in x0]
        self._seed_base = seed
        self._popsize = popsize or popsize_default(len(space.params))
        self._sigma0 = sigma0 or 1.0 / 6.0
        self._es = None
        self._gen: Generation | None = None
        self._slots: dict[int, list[int]] = {}  # trial number -> [generation, slot] it was given

    # -- replay -------------------------------------------------------------------------------
    def _new_es(self):
        import cma

        n = len(self._space.params)
        opts = {"popsize": self._popsize, "bounds": [0.0, 1.0], "seed": _seed(self._seed_base, 0, "pycma") + 1,
                "verbose": -9, "verb_log": 0, "verb_disp": 0}
        es = cma.CMAEvolutionStrategy(self._x0 or [0.5] * n, self._sigma0, opts)
        if self._x0 is not None:
            es.inject([self._x0], force=True)  # the first point asked is the warm start itself
        return es

    def _ask(self, number: int) -> None:
        np.random.seed(_seed(self._seed_base, number, "pycma-ask"))
        self._gen = Generation(number, [np.asarray(s, dtype=float) for s in self._es.ask()])

    @staticmethod
    def losses(trials: list[FrozenTrial]) -> dict[int, dict[int, float]]:
        """generation -> slot -> loss, from the trials that finished (interrupted ones excluded)."""
        out: dict[int, dict[int, float]] = {}
        for t in trials:
            slot = t.user_attrs.get(SLOT_ATTR)
            if slot is None or t.user_attrs.get(INTERRUPTED_ATTR):
                continue
            if t.state == TrialState.COMPLETE and t.value is not None and np.isfinite(t.value):
                loss = -float(t.value)
            elif t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL):
                loss = float("inf")
            else:
                continue
            out.setdefault(int(slot[0]), {})[int(slot[1])] = loss
        return out

    def _catch_up(self, study: optuna.Study) -> Generation:
        """Bring the strategy to the run's current generation (told every finished one)."""
        losses = self.losses(study.get_trials(deepcopy=False))
        if self._es is None:
            self._es = self._new_es()
            self._ask(0)
        gen = self._gen
        while True:
            gen.losses = dict(losses.get(gen.number, {}))
            if len(gen.losses) < len(gen.solutions):
                return gen
            vals = [gen.losses[i] for i in range(len(gen.solutions))]
            finite = [v for v in vals if np.isfinite(v)]
            worst = (max(finite) + 1.0) if finite else 1.0
            self._es.tell(gen.solutions, [v if np.isfinite(v) else worst for v in vals])
            self._ask(gen.number + 1)
            gen = self._gen

    # -- BaseSampler ---------------------------------------------------------------------------
    def infer_relative_search_space(self, study, trial):
        return self._space.distributions()

    def sample_relative(self, study, trial, search_space):
        if not search_space:
            return {}
        gen = self._catch_up(study)
        taken = {tuple(s) for n, s in self._slots.items() if n != trial.number}
        for i, x in enumerate(gen.solutions):
            if i not in gen.losses and (gen.number, i) not in taken:
                self._slots[trial.number] = [gen.number, i]
                if self._x0 is not None and gen.number == 0 and i == 0:
                    # pycma moves an injected point on the boundary a hair inside; the trial
                    # evaluates the recipe itself
                    return self._space.from_unit(self._x0)
                return self._space.from_unit(x)
        raise MergelabError(  # one process asks at a time (the loop refuses pycma workers)
            "pycma: every point of the current generation is being evaluated already; pycma runs "
            "in one process per run."
        )

    def sample_independent(self, study, trial, param_name, param_distribution):
        raise MergelabError(f"pycma: parameter {param_name} is not in the search space it was built for.")

    def after_trial(self, study, trial, state, values):
        self._slots.pop(trial.number, None)

    def slot_of(self, number: int) -> list[int] | None:
        """[generation, slot] the sampler gave trial `number` (for its user attribute)."""
        return self._slots.get(number)

    @property
    def warm_started(self) -> bool:
        """Generation 0's slot 0 is the warm start."""
        return self._x0 is not None

    @property
    def generation(self) -> int:
        return self._gen.number if self._gen is not None else -1
