"""Run directories: where a run lives, how it is written (staged, locked, atomic) and the one reader of a finished
run (`read_run` -> `SavedRun`), with the defaults of runs written by older versions in one table.

Nothing else opens a run's metrics.json or config.json. Light imports only: prediction and serving read runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import math
import os
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import methods
from .config import INCOMPLETE_SUFFIX, POOLINGS, PROBLEMS, TRUNCATIONS
from .errors import ConfigError, LightuneError, ModelError

COMPLETE_MARKER = "metrics.json"  # written last: a run directory without it is not a finished run
CONFIG_FILE = "config.json"  # written first: the settings the run was given (and, under "resolved", what they became)


# -- writing: atomic files, staged and locked run directories ------------------------------------------------------

def _umask_mode(kind: int = 0o666) -> int:
    """The mode a new plain file (kind 0o666) or directory (0o777) gets under the process's umask."""
    mask = os.umask(0)
    os.umask(mask)
    return kind & ~mask


def follow_umask(root: Path) -> None:
    """Give every folder and file under root (and root) the mode the umask gives new ones, as other tools' outputs
    have: mkdtemp makes 0700 folders and safetensors 0600 files, which a teammate could not read. Links are left
    alone (chmod would follow them)."""
    folder_mode, file_mode = _umask_mode(0o777), _umask_mode()
    os.chmod(root, folder_mode)
    for top, folders, files in os.walk(root):
        for name in folders + files:
            path = os.path.join(top, name)
            if not os.path.islink(path):
                os.chmod(path, folder_mode if name in folders else file_mode)


@contextlib.contextmanager
def atomic_file(path: Path, suffix: str = ".tmp"):
    """Yield a temporary path beside `path`; when the block finishes it replaces `path` with the permissions of a
    plain new file (mkstemp makes 0600 files; results are for sharing). On an error it is removed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically (temporary file + rename)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, obj) -> None:
    """Write JSON atomically (temporary file + rename); ValueError for NaN or infinity, which JSON cannot hold."""
    write_text(path, json.dumps(obj, indent=2, default=str, allow_nan=False) + "\n")


def default_run_name(cfg) -> str:
    data = Path(cfg.data).stem if not cfg.data.startswith("hub:") else cfg.data[4:].replace("/", "-")
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.method}-{data}"


def final_run_dir(cfg) -> Path:
    """Where the finished run will live; ConfigError if a run is already there (runs are never overwritten)."""
    root = Path(cfg.output_dir)
    if cfg.run_name:
        path = root / cfg.run_name
        if path.exists():
            raise ConfigError(f"run directory {path} already exists; choose another --run-name")
        return path
    path = root / default_run_name(cfg)
    suffix = 2
    while path.exists():
        path = root / f"{default_run_name(cfg)}-{suffix}"
        suffix += 1
    return path


@contextlib.contextmanager
def staged_run_dir(final: Path):
    """Yield a hidden work directory; rename it to `final` only if the block finishes.

    On an error, Ctrl-C or SIGTERM the work directory is kept as `<name>.incomplete` (or `.incomplete-2`, ... when
    that name is taken) with error.txt inside, and the exception gets an `incomplete_run_dir` attribute naming
    it. Nothing that looks like a finished run is left behind, and no existing directory is ever replaced.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".partial"))
    os.chmod(work, _umask_mode(0o777))  # mkdtemp's 0700: the run's folder is as shared as the umask says
    try:
        with run_lock(work):  # `train --resume` refuses a run that a live process is writing
            yield work
    except BaseException as exc:
        keep_incomplete(work, final, exc)
        raise
    follow_umask(work)
    if not _rename_to_new(work, final):
        appeared = ConfigError(f"run directory {final} appeared while training")
        kept = keep_incomplete(work, final, appeared)
        raise ConfigError(f"run directory {final} appeared while training; this run is kept in {kept}")


@contextlib.contextmanager
def run_lock(run_dir: Path | None, holder: str = "a running training"):
    """Hold an exclusive lock on run_dir (none for None; any directory or file) while the block runs; ConfigError
    naming `holder` when another process holds it. The operating system releases it when the process ends, even on
    SIGKILL."""
    if run_dir is None:
        yield
        return
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"{run_dir} is in use by {holder}") from None
        yield
    finally:
        os.close(fd)


def keep_incomplete(work: Path, final: Path, exc: BaseException) -> Path:
    """Write error.txt into work and rename it to the first free `<final>.incomplete[-N]`; return that path."""
    (work / "error.txt").write_text("".join(traceback.format_exception(exc)))
    with contextlib.suppress(OSError):  # a failure is kept whatever its files' modes
        follow_umask(work)
    for n in itertools.count(1):
        kept = final.parent / f"{final.name}{INCOMPLETE_SUFFIX}{'' if n == 1 else f'-{n}'}"
        if _rename_to_new(work, kept):
            with contextlib.suppress(AttributeError):
                exc.incomplete_run_dir = kept
            return kept


def _rename_to_new(src: Path, dest: Path) -> bool:
    """Rename directory src to dest if no dest exists; False (and nothing moved) when dest is taken."""
    try:
        dest.mkdir()  # claims the name atomically: fails if anything of that name exists, even a broken link
    except FileExistsError:
        return False
    os.rename(src, dest)  # replaces only the empty directory just made (POSIX rename of a directory)
    return True



def free_output_dir(root: Path, name: str, explicit: bool) -> Path:
    """root/name, or for a default name the first free root/name-2, -3, ...; ConfigError if an explicitly named
    directory exists (results are never overwritten)."""
    path = Path(root) / name
    if explicit and path.exists():
        raise ConfigError(f"{path} already exists; choose another --name")
    suffix = 2
    while path.exists():
        path = Path(root) / f"{name}-{suffix}"
        suffix += 1
    return path


def is_complete_run(path: Path) -> bool:
    """True for a finished run: its config.json and, written last, its metrics.json."""
    return (Path(path) / COMPLETE_MARKER).is_file() and (Path(path) / CONFIG_FILE).is_file()


# -- reading: the one reader of a run ------------------------------------------------------------------------------

# What runs written by older versions lack, and what it was then. Config settings (config.json, metrics.json's
# "config"): LoRA's options, truncation (head: the tokenizer's own cut, the default until 2026-11-29), the problem
# (single-label before multi-label existed), prompt tuning's length. Run fields (metrics.json): pooling ([CLS], the
# only head before pooling was recorded), calibration (no temperature: the softmax of the logits as they are).
OLD_CONFIG_DEFAULTS = {"rslora": False, "init": "default", "truncation": "head", "loraplus_lr_ratio": None,
                       "virtual_tokens": 20, "problem": "single_label", "label_columns": None,
                       "label_delimiter": None, "tune_thresholds": False,
                       "validation_labels": "separate"}  # before it: validation was always a separate split
OLD_RUN_DEFAULTS = {"pooling": "cls", "calibration": {"temperature": 1.0}}
SAVED_POOLINGS = tuple(p for p in POOLINGS if p != "auto")  # what a run records: the pooling "auto" resolved to
SAVED_KINDS = ("adapter", "model")  # the run's folder: a peft adapter + tokenizer, or the whole model
PICKLED_WEIGHTS = {"adapter": "adapter_model.bin", "model": "pytorch_model.bin"}  # refused: loading runs code


def saved_config(config: dict[str, Any]) -> dict[str, Any]:
    """A run's saved configuration (config.json, or metrics.json's "config") in today's terms.

    Runs written before peft and quantize existed have only `method`; newer ones write it beside them. Either
    way the method name decides peft and quantize, and settings missing from older runs are at their defaults
    then (OLD_CONFIG_DEFAULTS).
    """
    out = {**OLD_CONFIG_DEFAULTS, **config}
    if "method" in config:
        out["peft"], out["quantize"] = methods.split_method(config["method"])
    else:
        out["method"] = methods.method_label(out["peft"], out["quantize"])
    return out


def read_json(path: Path) -> Any:
    """A run file's JSON; ModelError naming the file when it is missing or not JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path} is damaged: not valid JSON ({str(exc).splitlines()[0]})") from None


def read_given_config(run_dir: Path) -> dict[str, Any]:
    """The settings a run (finished or not) was given, as its config.json holds them (resume and compare's reuse
    check compare these with what they are asked for)."""
    config = read_json(Path(run_dir) / CONFIG_FILE)
    if not isinstance(config, dict):
        raise ModelError(f"{Path(run_dir) / CONFIG_FILE} is damaged: not a JSON object")
    return config


@dataclass(frozen=True)
class SavedRun:
    """A finished run, read and checked once, every field resolved (old runs' defaults applied)."""

    run_dir: Path
    metrics: dict  # metrics.json as written
    config: dict  # its "config" in today's terms (saved_config)
    model: str  # the base model's name as given to training
    method: str  # the one-word method (dora+nf4); peft and quantize are its two parts
    peft: str
    quantize: str  # none, nf4 or int8: how the base is stored
    label_names: list[str]
    max_length: int
    truncation: str  # head, tail or head_tail (forward.encode_texts)
    pooling: str  # cls or mean (heads.apply_pooling)
    problem: str  # single_label or multi_label
    thresholds: list[float] | None  # a multi-label run's threshold per label, in label order; else None
    saved_kind: str  # adapter or model
    # what the logits are divided by before the softmax (calibration.apply_temperature): fitted on validation
    # after training; 1.0 for multi-label runs and runs from before calibration
    temperature: float = 1.0

    @property
    def saved(self) -> Path:
        """The folder with the weights and the tokenizer: <run>/adapter or <run>/model."""
        return self.run_dir / self.saved_kind

    @property
    def is_adapter(self) -> bool:
        return self.saved_kind == "adapter"

    @property
    def weights_file(self) -> Path:
        return self.saved / ("adapter_model.safetensors" if self.is_adapter else "model.safetensors")

    @property
    def test_as_predicted(self) -> dict:
        """The run's own test metrics as prediction sees them: loss and ECE at its temperature (the logits' own
        for runs without one); accuracy and the other metrics do not depend on it."""
        test = dict(self.metrics.get("test") or {})
        calibration = self.metrics.get("calibration")
        if isinstance(calibration, dict) and calibration.get("fitted_on"):
            test.update(loss=calibration.get("test_nll_after"), ece=calibration.get("ece_after"))
        return test


def read_run(run_dir: str | Path) -> SavedRun:
    """The finished run in run_dir; ModelError in one line if it is missing, unfinished or damaged."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ModelError(f"run directory not found: {run_dir}")
    if not is_complete_run(run_dir):
        raise ModelError(f"{run_dir} is not a finished lightune run (no metrics.json/config.json)")
    path = run_dir / COMPLETE_MARKER
    metrics = read_json(path)
    try:
        run = _saved_run(run_dir, metrics)
    except _Damaged as exc:
        raise ModelError(f"{path} is damaged: {exc}") from None
    _check_saved_folder(run)
    return run


class _Damaged(LightuneError):
    """What is wrong with a field of metrics.json."""


def _saved_run(run_dir: Path, metrics: Any) -> SavedRun:
    """The fields of a run from its metrics.json; _Damaged naming the first field that is not usable."""
    if not isinstance(metrics, dict):
        raise _Damaged("not a JSON object")
    fields = {**OLD_RUN_DEFAULTS, **metrics}
    if fields.get("saved") not in SAVED_KINDS:
        raise _Damaged(f"'saved' is {fields.get('saved')!r}, not 'adapter' or 'model'")
    raw, data = fields.get("config"), fields.get("data")
    if not isinstance(raw, dict) or not all(isinstance(raw.get(k), str) and raw[k] for k in ("model", "method")):
        raise _Damaged("'config' lacks the model or method")
    try:
        config = saved_config(raw)
    except ConfigError as exc:
        raise _Damaged(f"'config.method': {exc}") from None
    names = data.get("label_names") if isinstance(data, dict) else None
    if not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, str) for n in names) \
            or len(set(names)) != len(names):
        raise _Damaged("'data.label_names' is not a list of distinct label names")
    for where, value, allowed in (("config.truncation", config["truncation"], TRUNCATIONS),
                                  ("config.problem", config["problem"], PROBLEMS),
                                  ("pooling", fields["pooling"], SAVED_POOLINGS)):
        if value not in allowed:
            raise _Damaged(f"'{where}' is {value!r}, not one of {', '.join(allowed)}")
    length = fields.get("max_length")
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise _Damaged(f"'max_length' is {length!r}, not a positive integer")
    return SavedRun(run_dir=run_dir, metrics=metrics, config=config, model=config["model"], method=config["method"],
                    peft=config["peft"], quantize=config["quantize"], label_names=names, max_length=length,
                    truncation=config["truncation"], pooling=fields["pooling"], problem=config["problem"],
                    thresholds=_thresholds(fields, config["problem"], names), saved_kind=fields["saved"],
                    temperature=_temperature(fields))


def _temperature(metrics: dict) -> float:
    """The run's temperature: a positive finite number in "calibration" (1.0 for runs from before it)."""
    calibration = metrics.get("calibration")
    value = calibration.get("temperature") if isinstance(calibration, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise _Damaged(f"'calibration.temperature' is {value!r}, not a positive number")
    return float(value)


def _thresholds(metrics: dict, problem: str, names: list[str]) -> list[float] | None:
    """A multi-label run's threshold per label in label order (None for single-label runs)."""
    if problem != "multi_label":
        return None
    thresholds = metrics.get("thresholds")
    if not isinstance(thresholds, dict) or not all(
            isinstance(thresholds.get(n), (int, float)) and not isinstance(thresholds[n], bool)
            and math.isfinite(thresholds[n]) and 0 <= thresholds[n] <= 1 for n in names):
        raise _Damaged("'thresholds' does not give a threshold between 0 and 1 for every label")
    return [float(thresholds[n]) for n in names]


def _check_saved_folder(run: SavedRun) -> None:
    """ModelError unless the run's folder holds what its kind needs: weights as safetensors, never a pickle (it
    could run code when loaded), and an adapter's config or a model's config."""
    saved, kind = run.saved, run.saved_kind
    if not saved.is_dir():
        raise ModelError(f"{run.run_dir} has no saved {kind}/ directory")
    if run.is_adapter and not (saved / "adapter_config.json").is_file():
        raise ModelError(f"adapter missing: {saved}/adapter_config.json not found")
    if run.is_adapter:
        _check_adapter_config(saved / "adapter_config.json")
    if not run.is_adapter and not (saved / "config.json").is_file():
        raise ModelError(f"model missing: {saved}/config.json not found")
    if not run.weights_file.is_file():
        pickle = saved / PICKLED_WEIGHTS[kind]
        if pickle.exists():
            raise ModelError(f"{run.run_dir} has its {kind} weights as {pickle.name}, a pickle, which is never "
                             f"loaded here; save them as {run.weights_file.name}")
        raise ModelError(f"{run.run_dir} has no {kind} weights ({kind}/{run.weights_file.name})")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_names(value: Any) -> bool:
    return value is None or isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))


_POSITIVE = (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a positive integer")
_FRACTION = (lambda v: _is_number(v) and 0 <= v <= 1, "a number from 0 to 1")
_FLAG = (lambda v: isinstance(v, bool), "true or false")
_TEXT_OR_NULL = (lambda v: v is None or isinstance(v, str), "a string or null")
# The fields of adapter_config.json that lightune's methods write and peft reads, with what each must be: peft
# takes the file as it is, and a value of another type fails deep in the model's loading (a TypeError for
# "r": "eight"). Fields not named here are left to peft.
ADAPTER_FIELDS: dict[str, tuple[Any, str]] = {
    "peft_type": (lambda v: isinstance(v, str) and v != "", "a peft method name such as 'LORA'"),
    "r": _POSITIVE, "num_virtual_tokens": _POSITIVE,
    "lora_alpha": (_is_number, "a number"), "alpha": (_is_number, "a number"),
    "lora_dropout": _FRACTION, "rank_dropout": _FRACTION, "module_dropout": _FRACTION, "vera_dropout": _FRACTION,
    "target_modules": (_is_names, "a module name, a list of them or null"),
    "feedforward_modules": (_is_names, "a module name, a list of them or null"),
    "modules_to_save": (lambda v: v is None or (isinstance(v, list) and all(isinstance(m, str) for m in v)),
                        "a list of module names or null"),
    "layers_to_transform": (lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool)) or (
        isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v)),
                            "a layer index, a list of them or null"),
    "use_dora": _FLAG, "use_rslora": _FLAG, "fan_in_fan_out": _FLAG, "inference_mode": _FLAG,
    "init_lora_weights": (lambda v: isinstance(v, (bool, str)), "true, false or the name of an initialisation"),
    "bias": (lambda v: isinstance(v, str), "a string such as 'none'"),
    "task_type": _TEXT_OR_NULL, "base_model_name_or_path": _TEXT_OR_NULL,
}


MAX_ADAPTER_CONFIG_BYTES = 1 * 2**20  # adapter_config.json: a few kB of settings


def _size_text(size: int) -> str:
    return f"{size / 2**30:.1f} GB" if size >= 2**30 else f"{size / 2**20:.1f} MB"


def check_file_size(path: Path, limit: int, what: str) -> None:
    """ModelError when the file at path is larger than limit bytes (from its size on disk, nothing read)."""
    size = path.stat().st_size
    if size > limit:
        raise ModelError(f"{path} is {_size_text(size)}, more than {_size_text(limit)}: too large for {what}")


def _check_adapter_config(path: Path) -> None:
    """ModelError naming adapter_config.json and its first field that peft could not use (ADAPTER_FIELDS); its size
    is checked before it is read."""
    check_file_size(path, MAX_ADAPTER_CONFIG_BYTES, "an adapter's configuration")
    config = read_json(path)
    if not isinstance(config, dict):
        raise ModelError(f"{path} is damaged: not a JSON object")
    for key, (usable, expected) in ADAPTER_FIELDS.items():
        if (key in config or key == "peft_type") and not usable(config.get(key)):
            raise ModelError(f"{path} is damaged: {key!r} is {config.get(key)!r}, not {expected}")
