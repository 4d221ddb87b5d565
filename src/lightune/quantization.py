"""bitsandbytes 4-bit layers on CPU: where its packed AVX512-BF16 inference layout may be used, and never elsewhere.

On a CPU with AVX512-BF16, bitsandbytes' `Linear4bit.forward` repacks a layer's 4-bit weight in place into a
CPU-only layout the first time it runs in eval mode on an input that needs no gradient, and nothing unpacks it
when training starts: the next training step fails (its fast kernel has no backward), and the repacking
assumes a layer at least one quantization block wide (narrower layers fail at once). Unpacking is lossy too
(double-quantized scales pass through bf16). So a model that may be trained never takes that path, and a
model loaded only for prediction takes it on the layers that fit.
"""

from __future__ import annotations

import logging

# bitsandbytes packs output rows in blocks of 32 (`_convert_weight_packed_for_cpu(block_n=32)`)
PACKED_ROW_BLOCK = 32
HUB_KERNEL_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _HideHubKernelNotice(logging.Filter):
    """Drop bitsandbytes' notice that it could not fetch an optional CPU kernel from the Hugging Face hub.

    On AVX512-BF16 CPUs bitsandbytes tries, at import, to download a faster kernel with the `kernels` package;
    offline (and without that package) it logs a warning on every run, plain LoRA included. Nothing is wrong:
    its built-in kernel is used instead, so users should not see it.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(HUB_KERNEL_NOTICE)


def hide_hub_kernel_notice() -> None:
    """Install the filter on bitsandbytes' CPU logger (before bitsandbytes is imported, so the notice never shows)."""
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _HideHubKernelNotice) for f in logger.filters):
        logger.addFilter(_HideHubKernelNotice())


def linear4bit_layers(model) -> list:
    """The bitsandbytes 4-bit linear layers of a model (none when bitsandbytes is not installed)."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # pragma: no cover - bitsandbytes is a dependency, but stay usable without it
        return []
    return [module for module in model.modules() if isinstance(module, Linear4bit)]


def fits_packed_layout(layer) -> bool:
    """True when bitsandbytes can repack this layer: whole 32-row blocks and whole quantization blocks per row."""
    state = layer.weight.quant_state
    rows, cols = state.shape
    return rows % PACKED_ROW_BLOCK == 0 and cols >= state.blocksize and cols % state.blocksize == 0


def is_packed(layer) -> bool:
    return bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False))


def unpack(layer) -> None:
    """Put a layer repacked by bitsandbytes back into the standard 4-bit layout (which training and saving need)."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    state = layer.weight.quant_state
    nested = state.original_nested
    layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu_inverse(layer.weight.data, state)
    if not nested:  # bitsandbytes 0.50 restores the scales of double-quantized weights only; plain ones stay
        # transposed to (blocks, rows) in bf16: back to one fp32 scale per block in row order
        state.absmax = state.absmax.T.reshape(-1).float()


def keep_standard_layout(model) -> int:
    """Never let bitsandbytes repack this model's 4-bit weights (a model that may train); undo any repacking.

    Returns the number of 4-bit layers.
    """
    layers = linear4bit_layers(model)
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
        if is_packed(layer):
            unpack(layer)
    return len(layers)


def allow_cpu_inference_layout(model) -> int:
    """Let bitsandbytes use its fast AVX512-BF16 layout on the layers that fit it, for a prediction-only model.

    Only on CPUs with AVX512-BF16; layers narrower than a quantization block keep the standard layout.
    Returns the number of layers allowed.
    """
    from bitsandbytes import functional

    fast_cpu = functional.has_avx512bf16()
    allowed = 0
    for layer in linear4bit_layers(model):
        layer.support_avx512bf16_for_cpu = fast_cpu and fits_packed_layout(layer)
        allowed += layer.support_avx512bf16_for_cpu
    return allowed
