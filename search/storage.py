"""The Optuna storage of a run: opening it (with trial heartbeats for workers), the URL a run keeps
(without its password) and the one to open it with, and the trial ids the storage methods take.

Only Optuna's public API is used here and everywhere in search/ (BaseStorage methods,
RDBStorage's heartbeat settings, optuna.storages.fail_stale_trials): the storage object is the
one this module opened, never a study's private attribute.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import optuna

from mergelab.errors import MergelabError

from .rundir import RunDir

STORAGE_ENV = "MERGELAB_STORAGE"  # the full storage URL (with password) for resume / workers
HEARTBEAT_INTERVAL_S = 5  # a worker's trial heartbeat in a shared RDB storage
GRACE_PERIOD_S = 20  # a RUNNING trial without a heartbeat for this long is stale (its worker died)


def open_storage(url: str, heartbeat: bool):
    """The Optuna storage of `url` (journal:PATH, sqlite:///PATH, postgresql..., mysql...). With
    `heartbeat`, an RDB server storage records trial heartbeats, so fail_stale_trials (below) can
    tell a trial whose worker died on another machine."""
    if url.startswith("journal:"):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        return JournalStorage(JournalFileBackend(url[len("journal:"):]))
    if url.startswith(("sqlite:", "postgresql", "mysql")):
        kw = ({"heartbeat_interval": HEARTBEAT_INTERVAL_S, "grace_period": GRACE_PERIOD_S}
              if heartbeat and not url.startswith("sqlite") else {})
        try:
            return optuna.storages.RDBStorage(url, **kw)
        except Exception as e:  # connection errors come from many drivers
            raise MergelabError(
                f"Cannot open the study storage {url.split('@')[-1]}: {type(e).__name__}: {e}. Check the "
                "URL (postgresql+psycopg2://user:password@host/db, mysql+pymysql://..., sqlite:///path, "
                "journal:PATH) and that the server is running."
            ) from None
    raise MergelabError(
        f"--storage {url!r} is not a storage URL. Use postgresql+psycopg2://user:password@host/db, "
        "mysql+pymysql://user:password@host/db, sqlite:///PATH or journal:PATH."
    )


def public_url(url: str | None) -> str | None:
    """A storage URL without its password: what the run directory keeps (it is shared and read
    by anyone; the password comes from --storage or MERGELAB_STORAGE on resume)."""
    if url is None or "://" not in url:
        return url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}@{host}" if parts.username else host))


def storage_of(rd: RunDir, given: str | None = None) -> str:
    """The URL to open a run's storage with: `given` (--storage) or $MERGELAB_STORAGE when they
    name the run's storage (with a password the run directory does not keep), else the run's."""
    stored = rd.storage_url()
    given = given or os.environ.get(STORAGE_ENV)
    if given and given.startswith("journal:"):
        given = "journal:" + str(Path(given[len("journal:"):]).resolve())
    if not given or given == stored:
        return stored
    if public_url(given) != stored:
        raise MergelabError(
            f"The storage given ({public_url(given)}, from --storage or ${STORAGE_ENV}) is not the "
            f"storage of run {rd.path} ({stored}). Give that run's URL (with its password), or unset "
            f"${STORAGE_ENV}."
        )
    return given


def heartbeat_on(storage) -> bool:
    """Does this storage keep trial heartbeats (an RDB storage opened with heartbeat_interval)?
    Asked through the storage's own public methods."""
    interval = getattr(storage, "get_heartbeat_interval", None)
    return callable(getattr(storage, "record_heartbeat", None)) and callable(interval) and interval() is not None


def fail_stale(study: optuna.Study, storage) -> None:
    """RUNNING trials whose storage heartbeat stopped (a worker on any machine died) -> FAIL,
    with Optuna's public optuna.storages.fail_stale_trials. Such a trial carries no mergelab
    record (search/records.RECORD_ATTR), which is how optimizers.interrupted() tells it from
    a trial that failed on its own; recovery then records it and queues its re-try."""
    if not heartbeat_on(storage):
        return
    with warnings.catch_warnings():  # experimental since Optuna 2.9, unchanged since
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


class TrialIds:
    """Optuna trial numbers -> the storage's trial ids (what BaseStorage methods take), through
    the public get_study_id_from_name / get_trial_id_from_study_id_trial_number."""

    def __init__(self, storage, study_name: str):
        self.storage = storage
        self.study_id = storage.get_study_id_from_name(study_name)
        self._ids: dict[int, int] = {}

    def __call__(self, number: int) -> int:
        tid = self._ids.get(number)
        if tid is None:
            tid = self._ids[number] = self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)
        return tid
