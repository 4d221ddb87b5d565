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


FLOAT_FIELDS = ["alpha", "dropout", "attention_dropout", "validation_fraction", "test_fraction", "epochs",
                "learning_rate", "weight_decay", "warmup_ratio", "max_grad_norm"]


@pytest.mark.parametrize("name", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_every_number_must_be_finite(name, value):
    with pytest.raises(ConfigError, match=f"^{name} must be a finite number; got (nan|inf|-inf)$"):
        from_dict({name: value})


@pytest.mark.parametrize(
    "values, message",
    [
        ({"seed": 2**32}, "seed must be <= 4294967295"),
        ({"split_seed": -1}, "split_seed must be >= 0"),
        ({"epochs": 1e9}, "epochs must be <= 10000"),
        ({"rank": 10**20}, "rank must be <= 4096"),
        ({"num_workers": 10**6}, "num_workers must be <= 64"),
        ({"compile": "yes"}, "compile must be true or false"),
        ({"allow_unusual_labels": 1}, "allow_unusual_labels must be true or false"),
        ({"test_data": 5}, "test_data must be a non-empty string"),
        ({"model": "a\0b"}, "model must not contain a NUL character"),
        ({"label_names": [0, 1]}, "label_names must list at least two distinct names"),
    ],
)
def test_numbers_out_of_range_and_wrong_types(values, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(values)


@pytest.mark.parametrize("name", ["victim.incomplete", "victim.incomplete-2", "x.partial", ".hidden", "a/b", "a\\b",
                                  "a\0b", "tab\there", " padded ", "esc\x1b[2J", "x" * 256, "..", "."])
def test_reserved_and_unsafe_run_names_are_refused(name):
    with pytest.raises(ConfigError, match="run_name must"):
        from_dict({"run_name": name})


def test_plain_run_names_are_accepted():
    for name in ("my-run", "run.v2", "incomplete", "x.incompleted", "résumé 2"):
        assert from_dict({"run_name": name}).run_name == name


def test_output_dir_that_is_a_file_is_refused(tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("x")
    for output_dir in (file, file / "runs"):
        with pytest.raises(ConfigError, match=f"output_dir {output_dir}: {file} is not a directory"):
            from_dict({"output_dir": str(output_dir)})


def test_output_dir_inside_a_run_is_refused(tmp_path):
    finished = tmp_path / "runs" / "victim"
    finished.mkdir(parents=True)
    (finished / "config.json").write_text("{}")
    (finished / "metrics.json").write_text("{}")
    failed = tmp_path / "runs" / "other.incomplete-3"
    failed.mkdir()
    (failed / "error.txt").write_text("boom")
    for output_dir in (finished, finished / "adapter" / "deeper", failed):
        with pytest.raises(ConfigError, match="is inside the run directory"):
            from_dict({"output_dir": str(output_dir)})
    assert from_dict({"output_dir": str(tmp_path / "runs")}).output_dir == str(tmp_path / "runs")
    config_only = tmp_path / "project"  # a folder with a config.json of its own is not a run
    config_only.mkdir()
    (config_only / "config.json").write_text("{}")
    assert from_dict({"output_dir": str(config_only / "runs")})
