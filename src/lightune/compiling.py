"""--compile: the model that trains, evaluates and predicts (predict, serve), through torch.compile, in one place.

On the CPU the inductor backend compiles the model with dynamic shapes (CPU batches are padded to their longest
text, so widths vary): the same logits and LoRA gradients as eager mode, fused kernels. On CUDA the model is
compiled with mode="reduce-overhead" (CUDA graphs: one launch per captured graph instead of one per kernel, which
is what bounds a small model's step on a large GPU) and static shapes: batches come at the few fixed padded widths
of forward.pad_multiple, and a warm-up compiles the training step once per width before the run's clock starts,
logging what each cost; prediction pads a batch's rows to a power of two, so a few graphs per width serve any
batch. Where the compiled model cannot run (compiling raises, a method peft cannot trace, more
shapes than the graphs are kept for) the run goes on eagerly, said in one logged line.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable

import torch

MAX_CUDA_SHAPES = 64  # static-shape graphs kept on CUDA (8 widths x training, and inference at 1-64 rows);
# a batch of another shape runs eagerly beyond it


def compile_options(device_type: str) -> dict:
    """torch.compile's arguments for a device: CUDA graphs at static shapes on CUDA, inductor elsewhere."""
    if device_type == "cuda":
        return {"mode": "reduce-overhead", "dynamic": False}  # no mark_dynamic: one graph per fixed width
    return {"backend": "inductor", "dynamic": True}  # widths vary: one graph for all, not one per width first


class CompiledModel(torch.nn.Module):
    """A model and its torch.compile'd self, called like the model: each new input shape is compiled on its first
    call (its cost kept in compile_seconds); the eager model runs instead once compiling has failed, and on CUDA
    for shapes beyond max_shapes. Under static shapes (CUDA) an inference batch's rows are padded to a power of two
    (static_rows). Parameters, train()/eval() and no_sync are the model's own."""

    def __init__(self, model, device_type: str, log: Callable[[str], None], max_shapes: int | None = None):
        super().__init__()
        self.eager = model
        self.compiled = torch.compile(model, **compile_options(device_type))
        self.device_type, self.log, self.max_shapes = device_type, log, max_shapes
        self.compile_seconds: dict[tuple, float] = {}  # input shape (and grad mode) -> seconds of its first call
        self.failed: str | None = None  # why the model runs eagerly from now on
        self.beyond_limit = False  # a shape beyond max_shapes came (said once)

    def forward(self, **inputs):
        # chunks cut to their longest text are column slices: as they are, their strides would make dynamo
        # compile again (a guard on strides); contiguous copies of a few token ids cost nothing
        inputs = {k: v.contiguous() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        rows = None  # static shapes, inference: the batch's own rows, before padding (static_rows)
        if self.max_shapes is not None and not torch.is_grad_enabled():
            inputs, rows = static_rows(inputs)
        return first_rows(self.shaped_forward(inputs), rows)

    def shaped_forward(self, inputs: dict):
        """The compiled forward of one batch, compiling its shape first if new; the eager one where it cannot."""
        key = shape_key(inputs)
        if self.failed:
            return self.eager(**inputs)
        if key not in self.compile_seconds and self.max_shapes is not None \
                and len(self.compile_seconds) >= self.max_shapes:
            if not self.beyond_limit:
                self.beyond_limit = True
                self.log(f"--compile: more than {self.max_shapes} input shapes; batches of other shapes run eagerly")
            return self.eager(**inputs)
        first = key not in self.compile_seconds
        start = time.perf_counter()
        if self.device_type == "cuda":  # a new step of the CUDA graphs: earlier outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        try:
            out = self.compiled(**inputs)
        except Exception as exc:  # compiling raised: the run goes on with the eager model
            if not first:
                raise
            self.fall_back(exc)
            return self.eager(**inputs)
        if first:
            self.compile_seconds[key] = time.perf_counter() - start
        return out

    def fall_back(self, exc: BaseException) -> None:
        """From now on the eager model; one logged line says why."""
        first_line = (str(exc).strip().splitlines() or [""])[0][:160]
        self.failed = f"{type(exc).__name__}: {first_line}"
        self.log(f"--compile: the compiled model cannot run here ({self.failed}); continuing eagerly")

    def no_sync(self):
        """The model's own no_sync (DistributedDataParallel), for accelerate's gradient accumulation."""
        return getattr(self.eager, "no_sync", contextlib.nullcontext)()


def static_rows(inputs: dict) -> tuple[dict, int]:
    """(the inputs with their first row repeated up to the next power of two rows, their own row count): under
    static shapes an inference batch of any size then runs one of a few graphs per width (1, 2, 4 ... rows)
    instead of compiling one for each size that comes (the last batch of each width, every request to a server)."""
    rows = next(v.shape[0] for v in inputs.values() if isinstance(v, torch.Tensor))
    target = 1 << (rows - 1).bit_length()
    if target == rows:
        return inputs, rows
    return {k: torch.cat([v, v[:1].expand(target - rows, *v.shape[1:])]) if isinstance(v, torch.Tensor) else v
            for k, v in inputs.items()}, rows


def first_rows(out, rows: int | None):
    """A model output with its logits cut to the batch's own rows (static_rows' padding dropped)."""
    if rows is not None and out.logits.shape[0] != rows:
        out.logits = out.logits[:rows]
    return out


def shape_key(inputs: dict) -> tuple:
    """What a static-shape graph is specialised on: the inputs' names and shapes, and whether gradients are on."""
    return (torch.is_grad_enabled(),) + tuple(sorted((k, tuple(v.shape)) for k, v in inputs.items()
                                                     if isinstance(v, torch.Tensor)))


def compile_model(model, device: torch.device, log: Callable[[str], None]) -> CompiledModel:
    """The model for --compile (see the module's docstring); on CUDA dynamo keeps enough compiled variants of the
    forward for MAX_CUDA_SHAPES shapes in both modes (its default would stop at 8)."""
    max_shapes = None
    if device.type == "cuda":
        max_shapes = MAX_CUDA_SHAPES
        import torch._dynamo.config as dynamo_config

        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 2 * MAX_CUDA_SHAPES)
    return CompiledModel(model, device.type, log, max_shapes)


def warm_up_shapes(max_length: int, pad_multiple: int | None, batch_size: int,
                   chunk_tokens: int | None) -> list[tuple[int, int]]:
    """(rows, width) of the training forwards to compile before the run: each fixed padded width up to max_length
    with the rows of a full chunk at that width (the whole batch, or as many rows as the token budget takes)."""
    if not pad_multiple:
        return []  # widths vary (CPU): dynamic shapes, compiled on first use
    shapes = []
    for width in range(pad_multiple, max_length + 1, pad_multiple):
        rows = batch_size if chunk_tokens is None else max(1, min(batch_size, chunk_tokens // width))
        shapes.append((rows, width))
    return shapes


def warm_up(model: CompiledModel, shapes: list[tuple[int, int]], input_names: list[str], device: torch.device,
            autocast=contextlib.nullcontext) -> float:
    """Compile the training step (forward and backward) once per shape on dummy batches, before the run's clock
    starts; logs each shape's cost and returns the total seconds. Leaves no gradients and the random state as it
    was; compiling that fails ends in the eager model (CompiledModel.fall_back)."""
    total = 0.0
    model.train()
    rng_devices = [device] if device.type == "cuda" else []
    for rows, width in shapes:
        if model.failed:
            break
        batch = {name: torch.zeros(rows, width, dtype=torch.long, device=device) for name in input_names}
        if "attention_mask" in batch:
            batch["attention_mask"].fill_(1)
        start = time.perf_counter()
        try:
            with torch.random.fork_rng(devices=rng_devices):
                with autocast():
                    logits = model(**batch).logits
                logits.float().sum().backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        except Exception as exc:  # the backward's compilation, say
            model.fall_back(exc)
        finally:
            model.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
        total += seconds
        if not model.failed:
            model.log(f"--compile: training step at width {width} ({rows} rows) compiled in {seconds:.1f} s")
    return total


def training_model(model, cfg, device: torch.device, shapes: list[tuple[int, int]], input_names: list[str],
                   autocast, log: Callable[[str], None]):
    """The model training runs forwards through: the model itself, or with --compile a CompiledModel, warmed up at
    `shapes` (warm_up_shapes) on CUDA."""
    if not cfg.compile:
        return model
    compiled = compile_model(model, device, log)
    if device.type == "cuda" and shapes:
        seconds = warm_up(compiled, shapes, input_names, device, autocast)
        if not compiled.failed:
            log(f"--compile: {len(shapes)} widths compiled in {seconds:.1f} s (not counted as training time)")
    return compiled
