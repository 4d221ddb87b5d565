"""The README's "As a library" block, run as written with the tiny test model and data in place of the defaults."""

import re
from pathlib import Path

import lightune

README = Path(__file__).resolve().parent.parent / "README.md"


def library_block() -> str:
    section = README.read_text(encoding="utf-8").split("## As a library", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1
    return blocks[0]


def test_the_as_a_library_block_runs_as_written(tiny_model_dir, reviews_csv, tmp_path, monkeypatch, capsys):
    code = library_block()
    for call in ("lightune.train(", "lightune.predict(", "lightune.Classifier(", "lightune.evaluate("):
        assert call in code
    real_train = lightune.train
    tiny = dict(model=str(tiny_model_dir), data=str(reviews_csv), train_size=None, eval_size=None, max_length=32,
                epochs=2, learning_rate=1e-2, output_dir=str(tmp_path / "runs"))

    def train(**settings):  # the block's own settings, with the tiny model and data in place of the defaults
        return real_train(**{**settings, **tiny}, progress=False)

    monkeypatch.setattr(lightune, "train", train)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    out = capsys.readouterr().out
    result, classifier = namespace["result"], namespace["classifier"]
    assert result.run_dir == tmp_path / "runs" / "library-demo"
    assert f"{result.run_dir} {result.metrics['test']['accuracy']}" in out
    assert classifier.label_names == ["neg", "pos"] and namespace["logits"].shape == (2, 2)
    assert [p["label"] for p in namespace["predictions"]] == [["neg", "pos"][i] for i in
                                                              namespace["logits"].argmax(-1).tolist()]
    evaluation = namespace["evaluation"]
    assert evaluation.out_dir == tmp_path / "runs" / "evaluations" / "own-test"
    assert evaluation.result["metrics"]["accuracy"] == result.metrics["test"]["accuracy"]
