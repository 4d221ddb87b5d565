"""bitsandbytes' AVX512-BF16 CPU layout: decided and undone correctly on any host (the instruction set is simulated)."""

from __future__ import annotations

import logging

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
from bitsandbytes.functional import _convert_weight_packed_for_cpu  # noqa: E402

from lightune import models, quantization  # noqa: E402
from lightune.config import from_dict  # noqa: E402
from lightune.inference import Classifier  # noqa: E402
from lightune.training import run_training  # noqa: E402

LABELS = ["neg", "pos"]


@pytest.fixture
def avx512bf16_cpu(monkeypatch):
    """Make bitsandbytes believe this CPU has AVX512-BF16, as it does on some CI hosts."""
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True)
    monkeypatch.setattr(bnb.functional, "has_avx512bf16", lambda: True)


def nf4_layer(in_features: int, out_features: int, nested: bool = True):
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(in_features, out_features, quant_type="nf4", compress_statistics=nested,
                              compute_dtype=torch.float32)
    return layer.to("cpu")  # quantizes


def pack(layer) -> None:
    """What bitsandbytes' Linear4bit.forward does on an AVX512-BF16 CPU in eval mode (pure torch: runs anywhere)."""
    layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(layer.weight.data,
                                                                                layer.weight.quant_state)


def test_layers_narrower_than_a_quantization_block_do_not_fit_the_packed_layout():
    assert quantization.fits_packed_layout(nf4_layer(128, 64))
    assert not quantization.fits_packed_layout(nf4_layer(32, 32))  # 32 inputs < one 64-value block
    assert not quantization.fits_packed_layout(nf4_layer(128, 48))  # 48 rows: not whole 32-row blocks


def test_prediction_models_take_the_fast_layout_only_where_it_fits(avx512bf16_cpu):
    model = torch.nn.Sequential(nf4_layer(128, 64), nf4_layer(64, 32), nf4_layer(32, 32))
    quantization.keep_standard_layout(model)
    assert [layer.support_avx512bf16_for_cpu for layer in model] == [False, False, False]
    assert quantization.allow_cpu_inference_layout(model) == 2
    assert [layer.support_avx512bf16_for_cpu for layer in model] == [True, True, False]


def test_no_fast_layout_on_a_cpu_without_avx512bf16(monkeypatch):
    monkeypatch.setattr(bnb.functional, "has_avx512bf16", lambda: False)
    model = torch.nn.Sequential(nf4_layer(128, 64))
    assert quantization.allow_cpu_inference_layout(model) == 0
    assert not model[0].support_avx512bf16_for_cpu


@pytest.mark.parametrize("nested", [False, True])
def test_a_packed_layer_is_unpacked_before_it_trains(nested):
    layer = nf4_layer(128, 64, nested)
    x = torch.randn(3, 128)
    before, stored = layer(x).detach(), layer.weight.data.clone()
    pack(layer)
    assert quantization.is_packed(layer)
    assert quantization.keep_standard_layout(torch.nn.Sequential(layer)) == 1
    assert not quantization.is_packed(layer) and not layer.support_avx512bf16_for_cpu
    assert torch.equal(layer.weight.data, stored)  # the 4-bit codes come back exactly
    x.requires_grad_(True)
    layer.train()
    out = layer(x)
    out.sum().backward()  # the packed layout has no backward; the standard one does
    assert x.grad is not None
    # the 4-bit codes are exact; the per-block scales pass through bf16 in the packed layout (8 bits of mantissa)
    torch.testing.assert_close(out.detach(), before, atol=2e-2, rtol=2e-2)


def test_qlora_trains_and_predicts_on_an_avx512bf16_cpu(avx512bf16_cpu, tiny_config):
    """The CI failure: base evaluation in eval mode used to repack the weights, then training broke."""
    cfg = from_dict({"model": tiny_config().model, "method": "qlora"})
    model = models.load_base_model(cfg.model, LABELS, "qlora")
    assert all(not layer.support_avx512bf16_for_cpu for layer in quantization.linear4bit_layers(model))
    model = models.prepare_for_training(model, cfg)
    model.eval()  # as during the base evaluation, with an input that needs no gradient
    with torch.no_grad():
        model(input_ids=torch.randint(5, 40, (2, 8)))
    assert not any(quantization.is_packed(layer) for layer in quantization.linear4bit_layers(model))

    result = run_training(tiny_config(method="qlora", epochs=1), progress=False)
    assert result.metrics["test"]["accuracy"] > 0.5
    classifier = Classifier(result.run_dir, device="cpu")
    layers = quantization.linear4bit_layers(classifier.model)
    # prediction: the fast layout exactly where it fits; the tiny model's 32-wide inputs are below one block
    assert [layer.support_avx512bf16_for_cpu for layer in layers] == [quantization.fits_packed_layout(layer)
                                                                      for layer in layers]
    assert not all(layer.support_avx512bf16_for_cpu for layer in layers)
    quantization.keep_standard_layout(classifier.model)  # this host may lack the instructions the fast kernel uses
    assert classifier.predict(["great superb film"])[0]["label"] in LABELS


def test_bitsandbytes_hub_kernel_notice_is_hidden(caplog):
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'. "
                       "Please make sure you already `pip install kernels`")
        logger.warning("another bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["another bitsandbytes warning"]
