"""Checking a checkpoint before a run is resumed from it: its files against the checksums written when it was
saved, its trainer_state.json field by field, and its position against the run's schedule.

A checkpoint's trainer_state.json is written last and records the size and sha256 of every other file of the
checkpoint (CHECKSUMS_KEY), so a file truncated, changed or lost since is found before anything is loaded, copied
or removed. Each problem is a DamagedCheckpoint naming the file and what is wrong with it, in one line.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import LightuneError

CHECKSUMS_KEY = "checksums"  # trainer_state.json: {file: {"bytes": size, "sha256": hex}} of the checkpoint's files
COUNTS = ("step", "epoch", "batches_in_epoch", "examples", "stale")  # TrainerState's counters: integers >= 0


class DamagedCheckpoint(LightuneError):
    """What is wrong with a checkpoint, in one line naming the file."""


def sha256(path: Path) -> str:
    """The sha256 of a file (computed once per version of it: the run checks a checkpoint twice, before and after
    the model loads)."""
    stat = os.stat(path)
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns, stat.st_ino)


@functools.lru_cache(maxsize=256)
def _sha256(path: str, size: int, mtime_ns: int, inode: int) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def file_checksums(folder: Path, skip: str) -> dict[str, dict[str, Any]]:
    """{path relative to folder: {"bytes", "sha256"}} of every file in folder but `skip`."""
    return {path.relative_to(folder).as_posix(): {"bytes": path.stat().st_size, "sha256": sha256(path)}
            for path in sorted(Path(folder).rglob("*")) if path.is_file() and path.name != skip}


def check_files(checkpoint: Path, recorded: Any, required: tuple[str, ...]) -> None:
    """DamagedCheckpoint unless every file the checksums name is in checkpoint with its size and sha256, and they
    name the required files. recorded None (a checkpoint of a version before checksums): the required files must
    be there; loading them checks the rest."""
    if recorded is None:
        for name in required:
            if not (checkpoint / name).is_file():
                raise DamagedCheckpoint(f"{checkpoint.name}/{name} is missing")
        return
    if not isinstance(recorded, dict) or not all(_checksum_entry(name, entry) for name, entry in recorded.items()):
        raise DamagedCheckpoint(f"{checkpoint.name}/trainer_state.json is damaged: '{CHECKSUMS_KEY}' is not a "
                                f"table of file sizes and sha256 digests")
    for name in (*required, *recorded):
        if name not in recorded:
            raise DamagedCheckpoint(f"{checkpoint.name}/trainer_state.json is damaged: no checksum for {name}")
        path, entry = checkpoint / name, recorded[name]
        if not path.is_file():
            raise DamagedCheckpoint(f"{checkpoint.name}/{name} is missing")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise DamagedCheckpoint(f"{checkpoint.name}/{name} is damaged: {size} bytes, {entry['bytes']} when saved")
        if sha256(path) != entry["sha256"]:
            raise DamagedCheckpoint(f"{checkpoint.name}/{name} is damaged: its content differs from when it was "
                                    f"saved (sha256)")


def _checksum_entry(name: Any, entry: Any) -> bool:
    """True for a checksum entry of a file inside the checkpoint (a relative path without '..')."""
    parts = PurePosixPath(name).parts if isinstance(name, str) and name else ("..",)
    return (not PurePosixPath(name).is_absolute() and ".." not in parts and isinstance(entry, dict)
            and _is_count(entry.get("bytes")) and isinstance(entry.get("sha256"), str)
            and len(entry["sha256"]) == 64)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def state_fields(raw: Any, names: list[str], where: str) -> dict[str, Any]:
    """trainer_state.json's fields (its checksums apart), each of its type and consistent with the others;
    DamagedCheckpoint naming the first that is not. `names`: TrainerState's fields, every one required."""
    def damaged(problem: str) -> DamagedCheckpoint:
        return DamagedCheckpoint(f"{where} is damaged: {problem}")

    if not isinstance(raw, dict):
        raise damaged("not a JSON object")
    fields = {key: value for key, value in raw.items() if key != CHECKSUMS_KEY}
    missing, unknown = [n for n in names if n not in fields], sorted(k for k in fields if k not in names)
    if missing or unknown:
        raise damaged(f"no '{missing[0]}'" if missing else f"unknown field '{unknown[0]}'")
    for key in COUNTS:
        if not _is_count(fields[key]):
            raise damaged(f"'{key}' is {fields[key]!r}, not an integer >= 0")
    if not _is_number(fields["train_seconds"]) or fields["train_seconds"] < 0:
        raise damaged(f"'train_seconds' is {fields['train_seconds']!r}, not a number of seconds")
    if not isinstance(fields["stopped_early"], bool):
        raise damaged(f"'stopped_early' is {fields['stopped_early']!r}, not true or false")
    base = fields["base"]
    if not isinstance(base, dict) or not all(_is_number(base.get(k)) for k in ("accuracy", "f1")):
        raise damaged("'base' is not the base model's evaluation")
    _check_history(fields, damaged)
    if not isinstance(fields["step_losses"], list) or not all(_is_number(v) for v in fields["step_losses"]):
        raise damaged("'step_losses' is not a list of finite numbers")
    pending = fields["pending"]
    if not isinstance(pending, list) or not all(isinstance(p, list) and len(p) == 3 and _is_number(p[0])
                                                and _is_count(p[1]) and _is_count(p[2]) for p in pending):
        raise damaged("'pending' is not a list of [loss, epoch, step] entries")
    fields["pending"] = [tuple(p) for p in pending]
    return fields


def _check_history(fields: dict[str, Any], damaged) -> None:
    """history: evaluations at steps up to the state's, each with its validation metrics; best_index one of them
    (None before the first evaluation)."""
    history, best = fields["history"], fields["best_index"]
    if not isinstance(history, list) or not all(
            isinstance(entry, dict) and _is_count(entry.get("step")) and entry["step"] <= fields["step"]
            and isinstance(entry.get("validation"), dict)
            and all(_is_number(entry["validation"].get(k)) for k in ("loss", "accuracy", "f1")) for entry in history):
        raise damaged("'history' is not a list of evaluations up to the checkpoint's step")
    if history and not (_is_count(best) and best < len(history)):
        raise damaged(f"'best_index' is {best!r}, not an entry of its {len(history)} evaluations")
    if not history and best is not None:
        raise damaged(f"'best_index' is {best!r}, but there is no evaluation yet")


def check_position(state, n_steps: int, steps_per_epoch: int, where: str) -> None:
    """DamagedCheckpoint unless the state's step lies within the run's schedule (n_steps optimizer steps of
    steps_per_epoch batches an epoch) and is the batch of the epoch it records."""
    if not 1 <= state.step <= n_steps:
        raise DamagedCheckpoint(f"{where} does not fit the run: step {state.step}, but the run trains {n_steps} "
                                "steps")
    if not (1 <= state.batches_in_epoch <= steps_per_epoch
            and state.step == (state.epoch - 1) * steps_per_epoch + state.batches_in_epoch):
        raise DamagedCheckpoint(f"{where} does not fit the run: step {state.step} is not batch "
                                f"{state.batches_in_epoch} of epoch {state.epoch} ({steps_per_epoch} batches an "
                                "epoch)")
