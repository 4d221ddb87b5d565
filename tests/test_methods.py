"""The methods registry: peft and quantize are two settings and `method` names both; every registered method (and
LoRA's options) trains, saves a run that stock peft or transformers reload as the trained model, and predicts
through lightune's Classifier."""

import json

import pytest
import torch

from lightune import methods, models, quantization
from lightune.cli import build_parser, main
from lightune.commands.options import cli_overrides
from lightune.config import from_dict, load_config
from lightune.runs import saved_config
from lightune.data import build_splits
from lightune.errors import ConfigError, ModelError
from lightune.inference import Classifier
from lightune.training import run_training

LABELS = ["neg", "pos"]
TEXTS = ["great superb film loved", "awful boring mess hated"]


# -- names and settings --------------------------------------------------------------------------------------------

def test_registry_names_and_method_names():
    assert methods.names() == ["lora", "full", "head", "dora", "ia3", "loha", "lokr", "vera", "prompt"]
    assert methods.method_names()[:5] == ["lora", "qlora", "int8", "full", "head"]
    assert "dora+nf4" in methods.method_names() and "full+nf4" not in methods.method_names()
    assert {"vera+nf4", "prompt+int8"} <= set(methods.method_names()) and "loha+nf4" not in methods.method_names()
    for name in methods.method_names():  # every name is one (peft, quantize) pair and back
        assert methods.method_label(*methods.split_method(name)) == name
    assert methods.split_method("qlora") == ("lora", "nf4") and methods.split_method("ia3") == ("ia3", "none")


def test_a_method_is_registered_once():
    with pytest.raises(ValueError, match="already registered"):
        methods.register(methods.get("lora"))


@pytest.mark.parametrize("values, peft, quantize", [
    ({"method": "qlora"}, "lora", "nf4"),
    ({"method": "int8"}, "lora", "int8"),
    ({"method": "head"}, "head", "none"),
    ({"method": "dora+nf4"}, "dora", "nf4"),
    ({"peft": "ia3", "quantize": "int8"}, "ia3", "int8"),
    ({"method": "qlora", "peft": "lora"}, "lora", "nf4"),  # agreeing settings are fine
])
def test_method_names_peft_and_quantize(values, peft, quantize):
    cfg = from_dict(values)
    assert (cfg.peft, cfg.quantize) == (peft, quantize)
    assert cfg.to_dict()["method"] == cfg.method == methods.method_label(peft, quantize)


def test_flags_override_the_method_of_a_config_file(tmp_path):
    path = tmp_path / "cfg.toml"
    path.write_text('[train]\nmethod = "qlora"\n')
    assert load_config(path, {"quantize": "none"}).method == "lora"
    assert load_config(path, {"peft": "dora"}).method == "dora+nf4"
    assert load_config(path, {"method": "full"}).method == "full"


@pytest.mark.parametrize("values, message", [
    ({"method": "qlora", "quantize": "none"},
     "method 'qlora' means peft 'lora' with quantize 'nf4', but quantize 'none' is given with it"),
    ({"peft": "full", "quantize": "nf4"}, "quantize 'nf4' needs an adapter method: peft 'full' trains the model's"),
    ({"method": "head", "quantize": "int8"}, "method 'head' means peft 'head' with quantize 'none'"),
    ({"peft": "head", "quantize": "int8"}, "quantize 'int8' needs an adapter method: peft 'head'"),
    ({"method": "full+nf4"}, "method must be one of lora, qlora, int8, full, head, dora"),
    ({"peft": "prefix"}, "peft must be one of lora, full, head, dora, ia3"),
    ({"quantize": "fp4"}, "quantize must be one of none, nf4, int8"),
    ({"peft": "ia3", "rslora": True}, "rslora is an option of lora, dora; peft 'ia3' does not use it"),
    ({"peft": "head", "init": "olora"}, "init is an option of lora, dora; peft 'head' does not use it"),
    ({"init": "pissa", "quantize": "nf4"}, "init 'pissa' needs a full-precision base"),
    ({"init": "svd"}, "init must be one of default, pissa, olora, gaussian"),
    ({"rslora": "yes"}, "rslora must be true or false"),
    ({"peft": "loha", "quantize": "nf4"},
     "peft 'loha' cannot sit on a nf4 base (peft's LoHa and LoKr have no bitsandbytes layers); use quantize 'none'"),
    ({"peft": "lokr", "quantize": "int8"}, "peft 'lokr' cannot sit on a int8 base (peft's LoHa and LoKr have no"),
    ({"peft": "ia3", "loraplus_lr_ratio": 16}, "loraplus_lr_ratio is an option of lora, dora; peft 'ia3' does not"),
    ({"loraplus_lr_ratio": 0.5}, "loraplus_lr_ratio must be a number from 1 to 1000"),
    ({"loraplus_lr_ratio": float("nan")}, "loraplus_lr_ratio must be a number from 1 to 1000"),
    ({"peft": "vera", "virtual_tokens": 8}, "virtual_tokens is an option of prompt; peft 'vera' does not use it"),
    ({"peft": "prompt", "virtual_tokens": 0}, "virtual_tokens must be an integer from 1 to 512; got 0"),
])
def test_impossible_combinations_are_one_line(values, message):
    with pytest.raises(ConfigError) as err:
        from_dict(values)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_cli_method_is_peft_and_quantize(capsys):
    def settings(*argv):
        return load_config(None, cli_overrides(build_parser().parse_args(["train", *argv]))).to_dict()

    assert settings("--method", "qlora") == settings("--peft", "lora", "--quantize", "nf4")
    assert settings("--method", "int8") == settings("--peft", "lora", "--quantize", "int8")
    lora = settings("--peft", "dora", "--rslora", "--init", "gaussian")
    assert (lora["peft"], lora["rslora"], lora["init"]) == ("dora", True, "gaussian")
    assert settings("--loraplus-lr-ratio", "16")["loraplus_lr_ratio"] == 16
    assert settings("--peft", "prompt", "--virtual-tokens", "8")["virtual_tokens"] == 8
    assert main(["train", "--peft", "full", "--quantize", "nf4"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "lightune: error: quantize 'nf4' needs an adapter method: peft 'full' trains the model's own weights, which "
        "cannot be quantized; use quantize 'none'"]
    assert main(["train", "--peft", "lokr", "--quantize", "nf4"]) == 2  # refused before any model or data loads
    assert capsys.readouterr().err.strip().splitlines() == [
        "lightune: error: peft 'lokr' cannot sit on a nf4 base (peft's LoHa and LoKr have no bitsandbytes layers); "
        "use quantize 'none'"]


def test_saved_configs_old_and_new():
    old = {"model": "m", "method": "qlora", "rank": 8}
    assert saved_config(old) == {**old, "peft": "lora", "quantize": "nf4", "rslora": False, "init": "default",
                                 "truncation": "head", "loraplus_lr_ratio": None, "virtual_tokens": 20,
                                 "problem": "single_label", "label_columns": None, "label_delimiter": None,
                                 "tune_thresholds": False, "validation_labels": "separate"}
    new = from_dict({"peft": "dora", "quantize": "nf4", "rslora": True}).to_dict()
    assert saved_config(new) == new and new["method"] == "dora+nf4"


# -- what each method trains ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("peft, marker", [("dora", "lora_magnitude_vector"), ("ia3", "ia3_l"), ("loha", "hada_w"),
                                          ("lokr", "lokr_w"), ("vera", "vera_lambda_"), ("prompt", "prompt_encoder")])
def test_adapter_methods_train_their_adapter_and_the_head(tiny_model_dir, peft, marker):
    cfg = from_dict({"model": str(tiny_model_dir), "peft": peft, "max_length": 32})
    model = models.prepare_for_training(models.load_base_model(cfg.model, LABELS), cfg)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(marker in n for n in names) and any("classifier" in n for n in names)
    assert any("pooler" in n for n in names)
    assert all(marker in n or "lora_" in n or "classifier" in n or "pooler" in n for n in names)


def test_loraplus_trains_b_at_the_ratio_of_the_rate(tiny_model_dir):
    from lightune.training import build_optimizer

    cfg = from_dict({"model": str(tiny_model_dir), "loraplus_lr_ratio": 16, "learning_rate": 1e-3})
    model = models.prepare_for_training(models.load_base_model(cfg.model, LABELS), cfg)
    rates = {id(p): group["lr"] for group in build_optimizer(model, cfg, torch.device("cpu")).param_groups
             for p in group["params"]}
    named = dict(model.named_parameters())
    assert {rates[id(p)] for n, p in named.items() if "lora_B" in n} == {1e-3 * 16}
    assert {rates[id(p)] for n, p in named.items() if "lora_A" in n} == {1e-3}
    assert len(rates) == sum(p.requires_grad for p in named.values())  # every trained weight, once


def test_prompt_tuning_that_does_not_fit_the_positions_is_one_line(tiny_model_dir):
    cfg = from_dict({"model": str(tiny_model_dir), "peft": "prompt", "virtual_tokens": 40, "max_length": 32})
    with pytest.raises(ConfigError) as err:  # the tiny BERT has 64 positions
        models.prepare_for_training(models.load_base_model(cfg.model, LABELS), cfg)
    assert str(err.value) == ("prompt tuning puts 40 virtual tokens before each text of up to max_length 32 tokens, "
                              "more than the 64 positions of bert; lower max_length or virtual_tokens")


def test_dora_on_an_int8_base_on_cpu_is_refused_in_one_line(tiny_model_dir):
    cfg = from_dict({"model": str(tiny_model_dir), "peft": "dora", "quantize": "int8"})
    with pytest.raises(ConfigError, match="DoRA on an int8 base does not run on CPU"):
        models.prepare_for_training(models.load_base_model(cfg.model, LABELS, "int8"), cfg)


def test_ia3_needs_targets_where_peft_has_no_default(tmp_path):
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    DistilBertForSequenceClassification(DistilBertConfig(vocab_size=100, dim=32, n_layers=1, n_heads=2,
                                                         hidden_dim=64)).save_pretrained(tmp_path)
    cfg = from_dict({"model": str(tmp_path), "peft": "ia3"})
    with pytest.raises(ModelError, match="no default IA3 target modules for model type 'distilbert'"):
        models.prepare_for_training(models.load_base_model(cfg.model, LABELS), cfg)


# -- train, save, reload in stock peft / transformers, predict -----------------------------------------------------

def stock_model(run_dir, cfg):
    """The saved run loaded without lightune: transformers for a whole model; peft on a fresh base for an adapter."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    saved = run_dir / methods.get(cfg.peft).saves
    if saved.name == "model":
        return AutoModelForSequenceClassification.from_pretrained(saved).eval()
    kwargs = {}
    if cfg.quantize == "int8":
        kwargs = dict(device_map={"": "cpu"}, quantization_config=BitsAndBytesConfig(
            load_in_8bit=True, llm_int8_skip_modules=models.UNQUANTIZED_MODULES))
    if cfg.quantize == "nf4":
        kwargs = dict(device_map={"": "cpu"}, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=models.UNQUANTIZED_MODULES))
    base = AutoModelForSequenceClassification.from_pretrained(cfg.model, num_labels=len(LABELS), **kwargs)
    # on AVX512-BF16 CPUs bitsandbytes repacks 4-bit layers for inference, which fails on layers narrower than a
    # quantization block (this tiny model's 32 columns; the real model's fit): keep the standard 4-bit kernel
    quantization.keep_standard_layout(base)
    return PeftModel.from_pretrained(base, saved).eval()


CASES = [pytest.param(name, {}, id=name) for name in methods.names()] + [
    pytest.param("lora", {"rslora": True}, id="lora-rslora"),
    pytest.param("lora", {"init": "pissa"}, id="lora-pissa"),
    pytest.param("lora", {"init": "olora"}, id="lora-olora"),
    pytest.param("lora", {"init": "gaussian"}, id="lora-gaussian"),
    pytest.param("dora", {"quantize": "nf4"}, id="dora-nf4"),
    pytest.param("ia3", {"quantize": "nf4"}, id="ia3-nf4"),
    pytest.param("lora", {"loraplus_lr_ratio": 16}, id="lora-loraplus"),
    pytest.param("vera", {"quantize": "nf4"}, id="vera-nf4"),
    pytest.param("vera", {"quantize": "int8"}, id="vera-int8"),
    pytest.param("prompt", {"quantize": "nf4"}, id="prompt-nf4"),
    pytest.param("prompt", {"virtual_tokens": 4}, id="prompt-4-tokens"),
]


@pytest.mark.parametrize("peft, options", CASES)
def test_every_method_trains_saves_reloads_and_predicts(tiny_config, peft, options):
    from transformers import AutoTokenizer

    cfg = tiny_config(peft=peft, run_name=f"{peft}-{'-'.join(map(str, options.values()))}", max_steps=6,
                      learning_rate=1e-3 if peft == "full" else 1e-2, **options)
    result = run_training(cfg, progress=False)
    metrics, run_dir = result.metrics, result.run_dir
    assert metrics["saved"] == methods.get(peft).saves and metrics["config"]["method"] == cfg.method
    assert metrics["test"]["loss"] != pytest.approx(metrics["base"]["loss"], rel=1e-3)  # it trained
    if methods.get(peft).saves == "adapter":
        adapter_config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
        assert adapter_config["peft_type"] == methods.get(peft).kind.upper()
        assert adapter_config.get("use_dora", False) == (peft == "dora")
        assert adapter_config.get("use_rslora", False) == options.get("rslora", False)
        assert adapter_config.get("init_lora_weights", True) in (True, options.get("init"))

    splits = build_splits(cfg)
    texts, labels = list(splits.test["text"]), torch.tensor(splits.test["label"])
    tokenizer = AutoTokenizer.from_pretrained(run_dir / metrics["saved"])
    enc = tokenizer(texts, truncation=True, max_length=metrics["max_length"], padding=True, return_tensors="pt")
    with torch.no_grad():
        stock_logits = stock_model(run_dir, cfg)(**enc).logits
    # the saved run is the trained model: stock reload gives the test loss measured at the end of training
    stock_loss = torch.nn.functional.cross_entropy(stock_logits, labels).item()
    assert stock_loss == pytest.approx(metrics["test"]["loss"], rel=1e-4, abs=1e-5)
    # prediction may use bitsandbytes' bf16 AVX512-BF16 layout where a 4-bit layer fits it (test_quantization covers
    # that); here the fp32 kernel that stock peft ran above, for an exact comparison on every CPU
    unmerged = Classifier(run_dir, merge=False)
    quantization.keep_standard_layout(unmerged.model)
    torch.testing.assert_close(unmerged.logits(texts), stock_logits, rtol=1e-5, atol=1e-5)
    classifier = Classifier(run_dir)  # merged where the method and the base allow it
    quantization.keep_standard_layout(classifier.model)
    torch.testing.assert_close(classifier.logits(texts), stock_logits, rtol=1e-4, atol=1e-4)
    predictions = classifier.predict(TEXTS)
    assert [p["text"] for p in predictions] == TEXTS and all(p["label"] in LABELS for p in predictions)


# -- several runs of one method on one served base -----------------------------------------------------------------

@pytest.mark.parametrize("peft, second", [
    ("loha", {"rank": 4}), ("lokr", {"rank": 4}), ("vera", {}), ("prompt", {"virtual_tokens": 6}),
])
def test_adapters_of_one_kind_share_a_served_base(tiny_config, peft, second):
    from lightune.serving import AdapterRegistry

    runs = [run_training(tiny_config(peft=peft, run_name=f"{peft}-{i}", seed=i, max_steps=3, **extra),
                         progress=False).run_dir for i, extra in enumerate([{}, second])]
    registry = AdapterRegistry(device="cpu")
    for name, run in zip("ab", runs):
        registry.add(name, run)
    expected = [Classifier(run, merge=False).logits(TEXTS) for run in runs]
    for name, want in zip("ab", expected):  # each adapter is its own run, also after the other was loaded
        torch.testing.assert_close(registry.logits(TEXTS, name)[1], want, rtol=1e-5, atol=1e-5)
    batched = registry.forward_batch([registry.encode(TEXTS, name) for name in "ab"])  # the server's batched path
    for got, want in zip(batched, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_vera_runs_of_another_rank_do_not_share_a_base(tiny_config):
    from lightune.serving import AdapterRegistry

    registry = AdapterRegistry(device="cpu")
    registry.add("r8", run_training(tiny_config(peft="vera", run_name="vera-8", max_steps=2), progress=False).run_dir)
    other = run_training(tiny_config(peft="vera", rank=4, run_name="vera-4", max_steps=2), progress=False).run_dir
    with pytest.raises(ModelError) as err:
        registry.add("r4", other)
    assert "is a run of kind vera r=4 on default targets (vera), but the served adapters are of kind vera r=8 on " \
           "default targets" in str(err.value) and "\n" not in str(err.value)
    assert registry.names() == ["r8"]


def test_prompt_tuning_with_mean_pooling_averages_over_the_virtual_tokens_too(tiny_config):
    """peft extends the attention mask over the virtual tokens; lightune's mean pooler reads that mask, so the
    classifier reads the mean over prompt and text, in training, stock peft and lightune's prediction alike."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lightune import heads

    cfg = tiny_config(peft="prompt", pooling="mean", virtual_tokens=4, run_name="prompt-mean", max_steps=4)
    run_dir = run_training(cfg, progress=False).run_dir
    base = AutoModelForSequenceClassification.from_pretrained(cfg.model, num_labels=len(LABELS))
    heads.use_mean_pooling(base)
    masks = []
    base.bert.pooler.register_forward_hook(lambda module, args, out: masks.append(module.attention_mask))
    stock = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    enc = AutoTokenizer.from_pretrained(run_dir / "adapter")(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = stock(**enc).logits
    assert masks[-1].shape == (2, 4 + enc["input_ids"].shape[1]) and bool(masks[-1][:, :4].all())
    torch.testing.assert_close(Classifier(run_dir).logits(TEXTS), logits, rtol=1e-5, atol=1e-5)


# -- the methods comparison ----------------------------------------------------------------------------------------

def test_the_methods_comparison_plans_every_method_with_three_seeds():
    from pathlib import Path

    from lightune.compare_plan import load_plan

    plan = load_plan(Path(__file__).parents[1] / "examples" / "compare-methods.toml")
    configs = {cell.values["method"]: cell.cfg for cell in plan.cells}
    assert list(configs) == ["lora", "dora", "rslora", "ia3", "vera", "prompt", "full", "head"]
    assert len(plan.cells) == 24 and {cell.cfg.seed for cell in plan.cells} == {1, 2, 3}
    assert (configs["rslora"].peft, configs["rslora"].rslora, configs["lora"].rslora) == ("lora", True, False)
    assert (configs["vera"].peft, configs["vera"].rank, configs["lora"].rank) == ("vera", 256, 8)
    assert "method=rslora_seed=2" in {cell.name for cell in plan.cells}
    assert len({cell.cfg.data for cell in plan.cells}) == 1  # one data set, split and step count for all


@pytest.mark.parametrize("value, message", [
    ({"method": "lora", "rslora": True}, "[grid] method: a table of settings needs a label"),
    ({"label": "x", "method": "lora", "train_size": 10}, "[grid] method: table 'x' cannot set train_size"),
    ({"label": "x", "method": "lora", "colour": 1}, "[grid] method: table 'x' cannot set colour"),
    ({"label": "x", "method": "ia3", "rslora": True}, "grid cell method=x: rslora is an option of lora, dora"),
])
def test_bad_tables_in_a_grid_are_one_line(value, message):
    from lightune.compare_plan import plan_from_dict

    with pytest.raises(ConfigError) as err:
        plan_from_dict({"grid": {"method": ["lora", value]}})
    assert message in str(err.value) and "\n" not in str(err.value)
