import pytest

from lightune.config import TrainConfig, from_dict, load_config, validate
from lightune.errors import ConfigError


def test_defaults_are_valid_and_alpha_is_twice_rank():
    cfg = validate(TrainConfig())
    assert cfg.method == "lora" and cfg.lora_alpha == 2 * cfg.rank
    assert from_dict({"rank": 16}).lora_alpha == 32
    assert from_dict({"rank": 16, "alpha": 8}).lora_alpha == 8


def test_method_default_learning_rates_differ():
    assert from_dict({"method": "full"}).lr < from_dict({"method": "lora"}).lr
    assert from_dict({"method": "lora", "learning_rate": 0.01}).lr == 0.01


@pytest.mark.parametrize(
    "values, message",
    [
        ({"method": "prefix"}, "method must be one of lora, qlora, int8, full, head"),
        ({"rank": 0}, "rank must be >= 1"),
        ({"rank": 2.5}, "rank must be an integer"),
        ({"dropout": 1.0}, "dropout must be < 1"),
        ({"attention_dropout": 1.0}, "attention_dropout must be < 1"),
        ({"attention_dropout": -0.1}, "attention_dropout"),
        ({"learning_rate": -1.0}, "learning_rate must be > 0"),
        ({"bias": "some"}, "bias must be one of none, lora_only, all"),
        ({"device": "tpu"}, "device must be one of auto, cpu, cuda"),
        ({"epochs": 0}, "epochs must be > 0"),
        ({"train_size": 0}, "train_size must be >= 1"),
        ({"label_names": ["pos"]}, "label_names must list at least two distinct names"),
        ({"target_modules": []}, "target_modules must be a non-empty list"),
        ({"run_name": "../escape"}, "run_name must be a plain directory name"),
        ({"data": ""}, "data must be a non-empty string"),
        ({"bogus": 1}, "unknown config key(s): bogus"),
    ],
)
def test_bad_values_give_readable_errors(values, message):
    with pytest.raises(ConfigError) as err:
        from_dict(values)
    assert message in str(err.value)


def test_toml_file_with_train_table_and_overrides(tmp_path):
    path = tmp_path / "cfg.toml"
    path.write_text('[train]\nmethod = "qlora"\nrank = 16\ntarget_modules = ["query", "key", "value"]\n')
    cfg = load_config(path, {"rank": 4})
    assert cfg.method == "qlora" and cfg.rank == 4 and cfg.target_modules == ["query", "key", "value"]


def test_missing_and_malformed_toml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("rank = = 3\n")
    with pytest.raises(ConfigError, match="cannot parse config file"):
        load_config(bad)


def test_to_dict_records_resolved_values():
    d = from_dict({"rank": 4, "method": "qlora"}).to_dict()
    assert d["resolved"] == {"lora_alpha": 8, "learning_rate": 3e-3}
