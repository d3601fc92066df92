"""A study's finished runs, one JSON file each, so a study resumes and a re-run never redoes work.

Each (placement, seed) run is kept as ``<jobs>/<placement>-seed<seed>.json`` with the settings its
numbers depend on (`Settings`), hashed into a fingerprint. A run is taken back only when its
fingerprint matches; otherwise the study is refused with what changed. The placements and seeds
of a study are not settings: each run depends only on its own placement and seed, so adding a
seed, a placement or an activation runs only the new cells.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..core.atomic import atomic_path
from ..errors import BnmoveError

#: how the fingerprinted settings are named when one of them changed
_DESCRIBED = {
    "model": "the model (its architecture; with from_pretrained, its weights)",
    "data": "the data",
    "training": "the training",
}


@dataclass(frozen=True)
class EpochRecord:
    """One epoch of one run of bnmove's own training loop."""

    variant: str
    seed: int
    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    seconds: float


@dataclass
class Job:
    """One finished (placement, seed) run, as kept in a study's jobs folder."""

    fingerprint: str
    #: bnmove's loop: one record per epoch; empty for the user's own training
    records: list[EpochRecord]
    seconds: float
    start_digest: str
    #: digest of the batch order (bnmove's loop); empty where bnmove does not see the batches
    batch_digest: str
    #: the run's final metrics: what the user's training returned, or bnmove's loop's last epoch
    metrics: dict[str, float] = field(default_factory=dict)
    #: the settings behind ``fingerprint``, to say what changed when a run cannot be reused
    settings: dict[str, Any] = field(default_factory=dict)


def fingerprint(settings: dict[str, Any]) -> str:
    """The sha256 of ``settings`` (JSON with sorted keys)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def what_changed(old: dict[str, Any], new: dict[str, Any]) -> str:
    """``epochs 1 → 5; the data`` for two settings dicts; empty if they agree."""
    changes = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key):
            continue
        if key in _DESCRIBED:
            changes.append(_DESCRIBED[key])
        else:
            changes.append(f"{key} {_show(old.get(key))} → {_show(new.get(key))}")
    return "; ".join(changes)


def _show(value: Any) -> str:
    return "(none)" if value is None else json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def job_path(folder: Path, variant: str, seed: int) -> Path:
    return folder / f"{variant}-seed{seed}.json"


def load_job(folder: Path, variant: str, seed: int, settings: dict[str, Any]) -> Job | None:
    """The finished run kept in ``folder``, None if there is none; an error if it was made differently."""
    path = job_path(folder, variant, seed)
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text())
        job = Job(
            raw["fingerprint"],
            [EpochRecord(**r) for r in raw["records"]],
            float(raw["seconds"]),
            raw["start_digest"],
            raw["batch_digest"],
            {str(k): float(v) for k, v in raw.get("metrics", {}).items()},
            dict(raw.get("settings", {})),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise BnmoveError(f"{path}: not a run bnmove kept ({exc}); remove it or pass --force") from exc
    if job.fingerprint != fingerprint(settings):
        changed = what_changed(job.settings, settings) if job.settings else ""
        raise BnmoveError(
            f"{path}: this run was made with other settings, model or data"
            + (f" ({changed})" if changed else " (or by an earlier bnmove)")
            + "; resume with the same ones, or use another folder (--force starts over)"
        )
    return job


def save_job(folder: Path, variant: str, seed: int, job: Job) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    payload = {**asdict(job), "records": [asdict(r) for r in job.records]}
    with atomic_path(job_path(folder, variant, seed)) as tmp:
        tmp.write_text(json.dumps(payload, indent=1))


def finished_runs(folder: Path, variants: list[str], seeds: list[int]) -> int:
    """How many of these (placement, seed) runs ``folder`` keeps (without checking their settings)."""
    return sum(job_path(folder, v, s).exists() for v in variants for s in seeds)
