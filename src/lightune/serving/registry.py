"""The adapter registry: one base model in memory with several named adapters, each request's texts encoded for
its adapter, and the batched forward pass that runs rows of several adapters together."""

from __future__ import annotations

import ctypes
import gc
import logging
import re
import threading
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from peft import PeftModel
from peft.utils.other import ModulesToSaveWrapper
from transformers import AutoTokenizer

from .. import compiling, heads, methods, models, quantization
from ..errors import AdapterConflictError, LightuneError, ModelError, UnknownAdapterError
from ..forward import (encode_texts, eval_chunk_tokens, forward_logits, inference_dtype, pad_multiple, resolve_device,
                       texts_logits, token_budget_batches)
from ..inference import check_finite_weights, in_dtype, to_predictions
from ..runs import read_run
from ..texts import check_texts, clean_text
from .files import check_adapter_files, shown_model, tokenizer_key

log = logging.getLogger("lightune.serve")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def adapter_name_for(run_dir: str | Path) -> str:
    """A default adapter name: the run directory's name with characters peft cannot take replaced by '_'."""
    name = re.sub(r"[^A-Za-z0-9_-]", "_", Path(run_dir).resolve().name)[:64]
    return name or "adapter"


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its class name when it has none."""
    return str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__


def _with_shown_path(message: str, run_dir: Path, shown: str) -> str:
    """The message with the server's path of a run replaced by the name the client gave for it."""
    return message.replace(str(run_dir), shown)


def _release_freed_memory() -> None:
    """Collect an unloaded adapter's objects and hand the freed heap back to the system.

    glibc keeps freed memory for reuse: 50 adapters of all-MiniLM-L6-v2, each with its own tokenizer, took 540 MB;
    after deleting them RSS stayed 450 MB higher without malloc_trim and 66 MB higher with it."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


@dataclass
class ServedAdapter:
    """One loaded adapter and what predictions through it need: its labels, tokenizer and max_length."""

    name: str
    run_dir: Path
    model: str
    method: str  # the method name (dora+nf4); its two parts follow
    peft: str
    quantize: str  # the base storage the adapter was trained on: none, nf4 or int8
    label_names: list[str]
    max_length: int
    tokenizer: object
    tokenizer_key: str  # a digest of the tokenizer's files: equal keys share one tokenizer
    saved: Path
    shown: str  # the run directory as errors and /adapters name it
    pooling: str = "cls"  # what the head reads (heads.py); runs from before it was recorded read [CLS]
    mixes: bool = False  # its rows can share a forward pass with other adapters' rows (AdapterRegistry._mixes)
    truncation: str = "head"  # which tokens of a long text are kept (forward.encode_texts)
    kind: str | None = None  # what adapters on one base must share (methods.sharing_kind): lora, ia3, vera r=8 ...
    thresholds: list[float] | None = None  # a multi-label run's threshold per label (to_predictions)
    temperature: float = 1.0  # the run's calibration: its logits are divided by it before the softmax (to_predictions)

    def info(self) -> dict:
        """What clients see of it: names, never a path of the server (the log has those)."""
        return {"name": self.name, "run_dir": self.run_dir.name, "model": shown_model(self.model),
                "method": self.method, "labels": list(self.label_names), "max_length": self.max_length}


@dataclass
class Encoded:
    """A prediction request tokenized for its adapter (its tokenizer and max_length), not yet padded."""

    adapter: ServedAdapter
    texts: list[str]
    rows: list[dict]  # per text: input_ids, attention_mask (and token_type_ids) as lists

    @property
    def tokens(self) -> int:
        return sum(len(row["input_ids"]) for row in self.rows)


def padding_key(tokenizer) -> tuple:
    """What padding depends on: rows from tokenizers with equal keys (each row tokenized with its own run's tokenizer
    and max_length; runs' tokenizer files differ by their saved truncation alone) can be padded together."""
    return (tokenizer.pad_token_id, tokenizer.pad_token_type_id, tokenizer.padding_side,
            tuple(tokenizer.model_input_names))


# The layers peft 0.21 can run with per-row adapter_names when they are a copied head (ModulesToSaveWrapper).
MIXED_BATCH_HEADS = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


class AdapterRegistry:
    """ONE base model in memory with several named adapters of one kind (peft multi-adapter), switched per request.

    Each adapter brings its own classification head (peft's modules_to_save), label names and max_length.
    Adapters are never merged, so switching is cheap, and rows of several LoRA adapters can share one forward pass
    (forward_batch). A lock serialises forward passes and adapter changes.
    The weights are in `precision`'s dtype (forward.inference_dtype: bf16 on CUDA by default); with `compile` the
    passes of one adapter run through torch.compile (compiling.compile_model), those mixing adapters eagerly.
    At most max_adapters are loaded at once; adapters with identical tokenizer files share one tokenizer (about
    10 MB each for a BERT vocabulary, more than the adapter itself).
    """

    def __init__(self, device: str = "auto", batch_size: int = 32, max_adapters: int = 16, precision: str = "auto",
                 compile: bool = False):
        self.device = resolve_device(device)
        self.dtype = inference_dtype(precision, self.device)  # the served weights' (inference.in_dtype)
        self.compile = compile  # single-adapter passes through torch.compile (compiling.compile_model)
        self.forward_model = None  # what single-adapter passes run: the model, or its compiled self
        self.batch_size = batch_size
        self.max_adapters = max_adapters
        self.model: PeftModel | None = None
        self.adapters: OrderedDict[str, ServedAdapter] = OrderedDict()
        self.base_model: str | None = None  # the resolved model path or hub id shared by every adapter
        self.base_model_name: str | None = None  # as clients see it (files.shown_model: never a server path)
        self.quantization: str | None = None  # the served base's storage: none, nf4 or int8
        self.kind: str | None = None  # the peft kind of the served adapters (methods registry): lora, ia3
        self.pooling: str | None = None
        self.num_labels: int | None = None
        self._lock = threading.RLock()  # the model: forward passes, set_adapter, loading and unloading adapters
        # the adapters table alone (changed under both locks): a request looks its adapter up without waiting for
        # the forward pass in progress, so requests are tokenized and queued while the model runs
        self._table = threading.Lock()
        # fast tokenizers set their truncation per call and fail ("Already borrowed") when two threads call one
        self._tokenizing = threading.Lock()

    # -- adapters ---------------------------------------------------------------------------------------------
    @property
    def default(self) -> str | None:
        """The adapter used when a request names none: the oldest one still loaded."""
        return next(iter(self.adapters), None)

    def names(self) -> list[str]:
        with self._table:
            return list(self.adapters)

    def check_run(self, name: str, run_dir: str | Path, shown: str | None = None) -> ServedAdapter:
        """Read and check a run without touching the model: ModelError for anything that cannot be served.

        Messages name the run directory as `shown` (default: as given), never by another path."""
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise ModelError(f"bad adapter name {name!r}: use 1-64 letters, digits, '_' or '-'")
        shown = shown or str(run_dir)
        try:
            return self._read_adapter(name, Path(run_dir), shown)
        except ModelError as exc:
            raise type(exc)(_with_shown_path(str(exc), Path(run_dir), shown)) from None

    def _read_adapter(self, name: str, run_dir: Path, shown: str) -> ServedAdapter:
        run = read_run(run_dir)  # the one reader: every field checked and resolved there
        method = methods.get(run.peft)
        if not method.shares_base or not run.is_adapter:
            sharing = ", ".join(m.name for m in methods.REGISTRY.values() if m.shares_base)
            raise ModelError(f"{shown} is a {run.method} run without a LoRA adapter (or another shareable peft "
                             f"adapter); only {sharing} runs can be served together on one base model (use "
                             f"`lightune predict` for it)")
        problem = method.serving_problem(run.config) if method.serving_problem else None
        if problem:
            raise ModelError(f"{shown}: {problem} (use `lightune predict` for it)")
        files = check_adapter_files(run.saved)  # only what loading reads, each within a size limit
        check_finite_weights(run)
        try:
            key = tokenizer_key(run.saved, files)
            with self._table:
                tokenizer = next((a.tokenizer for a in self.adapters.values() if a.tokenizer_key == key), None)
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(run.saved)
        except Exception as exc:  # whatever its files hold: the run cannot be served, the server is fine
            raise ModelError(f"cannot load the tokenizer of {shown}: {_first_line(exc)}") from None
        return ServedAdapter(name=name, run_dir=run.run_dir.resolve(), model=run.model, method=run.method,
                             peft=run.peft, quantize=run.quantize, label_names=run.label_names,
                             max_length=run.max_length, tokenizer=tokenizer, tokenizer_key=key,
                             saved=run.saved, shown=shown, pooling=run.pooling, truncation=run.truncation,
                             kind=methods.sharing_kind(run.config), thresholds=run.thresholds,
                             temperature=run.temperature)

    def _check_compatible(self, adapter: ServedAdapter) -> None:
        if adapter.name in self.adapters:
            raise AdapterConflictError(f"an adapter named {adapter.name!r} is already loaded")
        if self.model is None:
            self._check_positions(adapter, models.load_model_config(adapter.model))
            return
        try:
            base = models.resolve_model_path(adapter.model)
        except (LightuneError, ValueError, OSError):  # one answer whatever is (not) at that path on the server
            base = None
        if base != self.base_model:  # (the served base is not named: it may be a path of the server)
            raise ModelError(f"{adapter.run_dir} was trained on {adapter.model!r}, not on the served base model; "
                             f"all served adapters must share one base model")
        if adapter.quantize != self.quantization:
            raise ModelError(f"{adapter.run_dir} is a {adapter.method} run (base quantization {adapter.quantize}), but "
                             f"the served base has quantization {self.quantization}; serve runs on the same base "
                             f"storage together")
        kind = adapter.kind
        if kind != self.kind:
            raise ModelError(f"{adapter.run_dir} is a run of kind {kind} ({adapter.method}), but the served adapters "
                             f"are of kind {self.kind}; peft puts adapters of one kind on a shared base")
        if adapter.pooling != self.pooling:
            raise ModelError(f"{adapter.run_dir} reads {adapter.pooling} pooling, but the served adapters read "
                             f"{self.pooling}; adapters on one base must pool the same way")
        if len(adapter.label_names) != self.num_labels:
            raise ModelError(f"{adapter.run_dir} has {len(adapter.label_names)} labels, but the served adapters have "
                             f"{self.num_labels}; all served adapters need the same number of labels")
        self._check_positions(adapter, self.model.config)

    @staticmethod
    def _check_positions(adapter: ServedAdapter, base_config) -> None:
        """max_length must fit the base model's position embeddings, or long texts would fail in the forward."""
        positions = getattr(base_config, "max_position_embeddings", None)
        if positions and adapter.max_length > positions:
            raise ModelError(f"{adapter.run_dir} has max_length {adapter.max_length}, more than the base model's "
                             f"{positions} positions")

    def add(self, name: str, run_dir: str | Path) -> ServedAdapter:
        """Load a finished adapter run under a name (the first one also loads the base model)."""
        adapter = self.check_run(name, run_dir)
        return self.add_checked(replace(adapter, shown=str(adapter.run_dir)))  # the operator's path, in full

    def add_checked(self, adapter: ServedAdapter) -> ServedAdapter:
        """Load an adapter that check_run accepted; if loading fails the served model is left as it was."""
        name, saved = adapter.name, adapter.saved
        with self._lock:
            try:
                self._check_compatible(adapter)
            except ModelError as exc:
                raise type(exc)(_with_shown_path(str(exc), adapter.run_dir, adapter.shown)) from None
            if len(self.adapters) >= self.max_adapters:
                raise AdapterConflictError(f"{len(self.adapters)} adapters are loaded, the most this server holds "
                                           f"(--max-adapters); delete one before adding {adapter.name!r}")
            try:
                if self.model is None:
                    base = models.load_base_on_device(adapter.model, adapter.label_names, adapter.quantize,
                                                      self.device)
                    heads.apply_pooling(base, adapter.pooling)
                    self.model = PeftModel.from_pretrained(base, saved, adapter_name=name).eval()
                    quantization.allow_cpu_inference_layout(self.model)  # serving never trains
                    self.forward_model = compiling.compile_model(self.model, self.device, log.info) \
                        if self.compile else self.model
                    self.base_model = models.resolve_model_path(adapter.model)
                    self.base_model_name = shown_model(adapter.model)
                    self.quantization = adapter.quantize
                    self.kind = adapter.kind
                    self.pooling = adapter.pooling
                    self.num_labels = len(adapter.label_names)
                else:
                    self.model.load_adapter(saved, adapter_name=name)
                    self.model.eval()
                in_dtype(self.model, self.dtype, adapter.quantize)  # peft loads adapters in fp32
                adapter.mixes = self._mixes(name)
            except Exception as exc:  # a truncated or foreign weights file, a head of another shape, ...
                if self.model is not None and name in self.model.peft_config:
                    self.model.delete_adapter(name)
                message = _with_shown_path(_first_line(exc), adapter.run_dir, adapter.shown)
                raise ModelError(f"cannot load the adapter of {adapter.shown}: {message}") from None
            with self._table:
                self.adapters[name] = adapter
            log.info("adapter %r loaded from %s", name, adapter.run_dir)
            return adapter

    def remove(self, name: str) -> None:
        """Unload an adapter; the last one cannot be removed (the server would have nothing to serve)."""
        with self._lock:
            self._get(name)
            if len(self.adapters) == 1:
                raise AdapterConflictError(f"{name!r} is the only adapter loaded; add another before removing it")
            self.model.delete_adapter(name)
            with self._table:
                del self.adapters[name]
        log.info("adapter %r unloaded", name)
        _release_freed_memory()

    def _get(self, name: str | None) -> ServedAdapter:
        name = self.default if name is None else name
        if name not in self.adapters:
            raise UnknownAdapterError(f"unknown adapter {name!r}; loaded: {', '.join(self.adapters) or 'none'}")
        return self.adapters[name]

    # -- prediction -------------------------------------------------------------------------------------------
    def logits(self, texts: list[str], adapter: str | None = None) -> tuple[ServedAdapter, torch.Tensor]:
        """Logits through one adapter (default: the oldest loaded), in input order."""
        texts = check_texts(texts)
        with self._lock:
            served = self._get(adapter)
            self.model.set_adapter(served.name, inference_mode=True)
            out = texts_logits(self.forward_model, served.tokenizer, texts, served.max_length,
                               len(served.label_names), self.batch_size, self.device, truncation=served.truncation)
        return served, out

    def predict(self, texts: list[str], adapter: str | None = None) -> tuple[ServedAdapter, list[dict]]:
        """(the adapter used, [{text, label, probabilities}] in input order), like Classifier.predict."""
        texts = check_texts(texts)
        if not texts:
            return self._get(adapter), []
        served, logits = self.logits(texts, adapter)
        return served, to_predictions(texts, logits, served.label_names, served.thresholds, served.temperature)

    # -- batched prediction: several requests, several adapters, shared forward passes ---------------------------
    def _mixes(self, name: str) -> bool:
        """Whether an adapter's rows can share a forward pass with other adapters' rows (peft's per-row
        adapter_names, peft 0.21): LoRA only (IA3 layers have no mixed forward), not DoRA (peft refuses it), never
        merged (serving never merges), and every head module it copies a single layer: peft's ModulesToSaveWrapper
        mixes Linear, Embedding and Conv layers only, so a [CLS]-pooled BERT head (its pooler is Linear + tanh)
        does not mix, while a mean-pooled head (the classifier Linear alone) does."""
        if self.kind != "lora" or getattr(self.model.peft_config[name], "use_dora", False):
            return False
        return all(isinstance(module.original_module, MIXED_BATCH_HEADS) for module in self.model.modules()
                   if isinstance(module, ModulesToSaveWrapper) and name in module.modules_to_save)

    def encode(self, texts: list[str], adapter: str | None = None) -> Encoded:
        """A request's texts tokenized for its adapter (default: the oldest loaded), for forward_batch."""
        texts = check_texts(texts)
        with self._table:
            served = self._get(adapter)
        with self._tokenizing:
            encoded = encode_texts(served.tokenizer, [clean_text(t) for t in texts], served.max_length,
                                   served.truncation)
        return Encoded(served, texts, [{key: encoded[key][i] for key in encoded} for i in range(len(texts))])

    @torch.no_grad()
    def forward_batch(self, requests: list[Encoded]) -> list[torch.Tensor | UnknownAdapterError]:
        """Each request's logits in input order (or UnknownAdapterError if its adapter was unloaded meanwhile).

        The rows of all requests are sorted by length into token-budget passes of at most batch_size texts. Rows of
        adapters that mix (and pad alike) share passes whatever their adapter, each row through its own adapter;
        the others run one adapter per pass, after set_adapter."""
        out: list[torch.Tensor | UnknownAdapterError] = []
        groups = defaultdict(list)  # (mixed or alone, padding or adapter) -> [(request index, row index)]
        with self._lock:
            for r, request in enumerate(requests):
                served = request.adapter
                if self.adapters.get(served.name) is not served:
                    out.append(UnknownAdapterError(f"adapter {served.name!r} was unloaded before the request ran"))
                    continue
                out.append(torch.empty(len(request.rows), self.num_labels))
                key = ("mixed", padding_key(served.tokenizer)) if served.mixes else ("alone", served.name)
                groups[key] += [(r, i) for i in range(len(request.rows))]
            for (how, _), members in groups.items():
                self._forward_rows(requests, members, out, mixed=how == "mixed")
        return out

    def _forward_rows(self, requests: list[Encoded], members: list[tuple[int, int]], out: list, mixed: bool) -> None:
        tokenizer = requests[members[0][0]].adapter.tokenizer  # every member's tokenizer pads alike
        lengths = [len(requests[r].rows[i]["input_ids"]) for r, i in members]
        for idx in token_budget_batches(lengths, eval_chunk_tokens(self.device.type), self.batch_size):
            chosen = [members[k] for k in idx]
            widest = max(requests[r].adapter.max_length for r, _ in chosen)
            batch = tokenizer.pad([requests[r].rows[i] for r, i in chosen], return_tensors="pt",
                                  pad_to_multiple_of=pad_multiple(self.device.type, widest))
            names = [requests[r].adapter.name for r, _ in chosen]
            if mixed:
                logits = forward_logits(self.model, batch, self.device, adapter_names=names)
            else:
                self.model.set_adapter(names[0], inference_mode=True)
                logits = forward_logits(self.forward_model, batch, self.device)
            for (r, i), row in zip(chosen, logits):
                out[r][i] = row
