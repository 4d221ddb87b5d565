"""Prediction speed: per-text prediction (the common recipe) vs lightune's batched path, same adapter, same texts.

common:   the seed projects' predict(): one text at a time, unmerged PEFT model in fp32, tokenizer(text,
          truncation=True)
lightune: Classifier.predict(): adapter merged into the base weights, texts sorted by length into
          token-budget batches (2,048 padded tokens per batch on CPU)

Besides texts/s it prints the useful compute rate (the FLOPs of the unpadded texts per second) next to the
best rate of one large fp32 matrix product of the model's own shapes, measured in the same process: a recipe
near that rate has little left to gain from any fp32 path (only fewer FLOPs or lower precision help there).
It also times the run exported by `lightune export --format onnx` (pooling, head and probabilities in one graph)
in ONNX Runtime, fed the same token-budget batches, beside the PyTorch path (needs pip install 'lightune[export]').
lightune predicts in bf16 on CUDA (its default precision there; fp32 on CPU). On CUDA it also times lightune in
fp32 and `lightune predict --compile` (CUDA graphs at the fixed padded widths, rows padded to powers of two; timed
on a second pass over the texts, the first one's compiling reported beside it); --alternatives times the compiled
path on CPU too, and dynamic int8 quantization of the merged model. --pipeline-baseline times a batched stock
transformers pipeline("text-classification") on the merged model in bf16 (its batches in input order, padded to
their longest text: what a user of the stock API gets). --json writes the rows (after each one).

    python benchmarks/bench_predict.py --device cuda --texts 2000 --pipeline-baseline --json bench-predict.json

    python benchmarks/bench_predict.py                          # trains a small adapter first
    python benchmarks/bench_predict.py --run-dir runs/<run> --data rotten_tomatoes --alternatives
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from types import SimpleNamespace


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", help="a finished lightune run (default: train a small LoRA adapter first)")
    p.add_argument("--data", default="imdb", help="where the texts come from (its test split)")
    p.add_argument("--texts", type=int, default=1000)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--alternatives", action="store_true",
                   help="also time torch.compile and dynamic int8 on the merged model")
    p.add_argument("--pipeline-baseline", action="store_true",
                   help='also time a batched stock pipeline("text-classification") in bf16')
    p.add_argument("--pipeline-batch-size", type=int, default=64)
    p.add_argument("--json", help="also write the rows to this JSON file (after each one)")
    return p.parse_args(argv)


def quick_run(output_dir: str) -> str:
    from lightune.config import load_config
    from lightune.training import run_training

    cfg = load_config(overrides=dict(data="imdb", train_size=320, eval_size=64, max_steps=20, output_dir=output_dir,
                                     run_name="bench-predict"))
    return str(run_training(cfg, progress=False).run_dir)


def benchmark_texts(source: str, n: int) -> tuple[list[str], list[int]]:
    """The first n texts of a fixed, seeded test split and their gold label ids."""
    from lightune.config import from_dict
    from lightune.data import build_splits

    # test_fraction 0.1 of IMDb is ~2,490 reviews
    splits = build_splits(from_dict({"data": source, "train_size": 10, "eval_size": n}))
    return list(splits.test["text"])[:n], list(splits.test["label"])[:n]


def useful_flops(model, lengths: list[int]) -> float:
    """Forward FLOPs of the texts without padding: 2 per weight of the encoder's linear layers per token, plus
    the attention products (4 * length^2 * hidden per layer)."""
    import torch

    config = model.config
    encoder_weights = sum(m.weight.numel() for name, m in model.named_modules()
                          if isinstance(m, torch.nn.Linear) and ".layer." in name)
    return sum(2 * n * encoder_weights + 4 * config.num_hidden_layers * n * n * config.hidden_size for n in lengths)


def matmul_flops_per_s(config, device, windows: int = 8, seconds: float = 0.4) -> float:
    """Best FLOP/s over several short windows of a (2048 x hidden) @ (hidden x intermediate) fp32 product, the
    model's feed-forward shape (the best window, as other load on the machine only lowers it)."""
    import torch

    a = torch.randn(2048, config.hidden_size, device=device)
    b = torch.randn(config.hidden_size, config.intermediate_size, device=device)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(windows):
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            count += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, count * 2 * a.shape[0] * a.shape[1] * b.shape[1] / (time.perf_counter() - start))
    return best


def per_text(classifier, texts: list[str]):
    """The common recipe: one forward pass per text through the unmerged PEFT model. It keeps the same tokens as
    the run (the end of a text for a tail-truncated run; head_tail has no tokenizer setting and keeps the head) and
    divides by the run's temperature, so that its labels and probabilities are comparable with lightune's."""
    import torch

    probs = []
    classifier.tokenizer.truncation_side = "left" if classifier.truncation == "tail" else "right"
    start = time.perf_counter()
    with torch.no_grad():
        for text in texts:
            enc = classifier.tokenizer(text, truncation=True, max_length=classifier.max_length,
                                       return_tensors="pt").to(classifier.device)
            logits = classifier.model(**enc).logits.float() / classifier.temperature
            probs.append(torch.softmax(logits, -1).cpu())
    return time.perf_counter() - start, torch.cat(probs)


def batched(classifier, texts: list[str], temperature: float | None = None):
    """Lightune's batched path: (seconds, probabilities of the logits divided by the run's temperature, or by the
    given one: 1 for a model that has the temperature folded in, as an export has)."""
    import torch

    start = time.perf_counter()
    logits = classifier.logits(texts)
    return time.perf_counter() - start, torch.softmax(logits / (temperature or classifier.temperature), -1)


def with_model(classifier, model, texts: list[str], temperature: float | None = None):
    """Lightune's batching with another forward module (after one warm-up batch, e.g. for compilation)."""
    original = classifier.model
    classifier.model = model
    try:
        classifier.logits(texts[:8])
        return batched(classifier, texts, temperature)
    finally:
        classifier.model = original


class OnnxClassifier:
    """An ONNX Runtime session called like a transformers classifier: model(**batch).logits."""

    def __init__(self, session, input_names: list[str]):
        self.session, self.input_names = session, input_names

    def __call__(self, **batch):
        import torch

        feeds = {k: batch[k].cpu().numpy().astype("int64") for k in self.input_names}
        return SimpleNamespace(logits=torch.from_numpy(self.session.run(None, feeds)[0]))


def exported_onnx(classifier, texts: list[str], folder: str):
    """Lightune's batching through ONNX Runtime on the run as `lightune export --format onnx` writes it (the export
    checks its probabilities against lightune's before it is used here); the first of its outputs is the logits."""
    import onnxruntime

    from lightune.export import export_run

    # head_tail has no tokenizer equivalent; the graph itself is the same whatever the cut (the tokens come from
    # the classifier here)
    truncation = "tail" if classifier.truncation == "head_tail" else None
    out = export_run(classifier.run_dir, os.path.join(folder, "onnx"), "onnx", truncation, log=lambda line: None)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), options, providers=["CPUExecutionProvider"])
    # the export divides its final layer by the run's temperature: its logits are already calibrated
    return with_model(classifier, OnnxClassifier(session, [i.name for i in session.get_inputs()]), texts,
                      temperature=1.0)


def in_bf16(model):
    """A bf16 copy of a model (the original stays as it is)."""
    import copy

    import torch

    return copy.deepcopy(model).to(torch.bfloat16)


def stock_pipeline(classifier, texts: list[str], batch_size: int):
    """A stock transformers text-classification pipeline on a bf16 copy of the merged model, batched, after one
    warm-up batch; the probabilities in label-id order."""
    import torch
    from transformers import pipeline

    model = in_bf16(classifier.model)
    pipe = pipeline("text-classification", model=model, tokenizer=classifier.tokenizer, device=classifier.device)
    options = dict(batch_size=batch_size, truncation=True, max_length=classifier.max_length, top_k=None)
    pipe(texts[:batch_size], **options)
    start = time.perf_counter()
    results = pipe(texts, **options)
    seconds = time.perf_counter() - start
    probs = torch.zeros(len(texts), model.config.num_labels)
    for i, scores in enumerate(results):
        for entry in scores:
            probs[i, model.config.label2id[entry["label"]]] = entry["score"]
    return seconds, probs


def compiled_path(run_dir: str, device: str, texts: list[str]):
    """(seconds, probabilities, how) of `lightune predict --compile`: a first pass over the texts compiles each
    shape they need (its time reported), the second is timed."""
    from lightune.inference import Classifier

    classifier = Classifier(run_dir, device=device, compile=True, log=print)
    start = time.perf_counter()
    classifier.logits(texts)
    first = time.perf_counter() - start
    shapes = len(classifier.forward_model.compile_seconds)
    print(f"--compile: first pass over the texts {first:.1f} s ({shapes} shapes compiled)")
    seconds, probs = batched(classifier, texts)
    return seconds, probs, f"merged, {precision_of(classifier)}, torch.compile ({shapes} shapes; first pass {first:.1f} s)"


def precision_of(classifier) -> str:
    return str(classifier.dtype).removeprefix("torch.").replace("bfloat16", "bf16").replace("float32", "fp32")


def alternatives(classifier, texts: list[str]) -> dict:
    """(seconds, probabilities) of the optional paths; a path this machine cannot run reports why."""
    import torch

    paths = {
        "dynamic int8": lambda: with_model(classifier, torch.ao.quantization.quantize_dynamic(
            classifier.model, {torch.nn.Linear}, dtype=torch.qint8), texts),
    }
    results = {}
    for name, run in paths.items():
        try:
            results[name] = run()
        except Exception as exc:  # report, do not hide, a path this machine cannot run
            results[name] = f"unavailable: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
    return results


def main(argv=None) -> int:
    warnings.filterwarnings("ignore")
    import datasets
    import torch

    from lightune.texts import clean_text
    from lightune.inference import Classifier

    datasets.disable_progress_bars()
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.run_dir or quick_run(tmp)
        texts, gold = benchmark_texts(args.data, args.texts)
        texts, gold = [clean_text(t) for t in texts], torch.tensor(gold)
        common = Classifier(run_dir, device=args.device, merge=False, precision="fp32")
        fast = Classifier(run_dir, device=args.device, merge=True)  # lightune's default precision: bf16 on CUDA
        lengths = [len(ids) for ids in fast.tokenizer(texts, truncation=True, max_length=fast.max_length)["input_ids"]]
        flops = useful_flops(fast.model, lengths)
        ceiling = matmul_flops_per_s(fast.model.config, fast.device)
        rows = {"common": (*per_text(common, texts), "per text, unmerged adapter, fp32"),
                "lightune": (*batched(fast, texts), f"merged, {precision_of(fast)}, token-budget batches")}
        write_rows(args, texts, gold, flops, ceiling, rows)
        if fast.device.type == "cuda":
            fp32 = Classifier(run_dir, device=args.device, merge=True, precision="fp32")
            rows["lightune fp32"] = (*batched(fp32, texts), "merged, fp32, token-budget batches")
            del fp32
        if args.pipeline_baseline:
            try:
                rows["pipeline bf16"] = (*stock_pipeline(fast, texts, args.pipeline_batch_size),
                                         f'pipeline("text-classification"), bf16, batch {args.pipeline_batch_size}')
            except Exception as exc:  # report, do not hide, a path this machine cannot run
                rows["pipeline bf16"] = f"unavailable: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
        write_rows(args, texts, gold, flops, ceiling, rows)
        try:
            rows["onnx export"] = (*exported_onnx(fast, texts, tmp), "lightune export --format onnx, ONNX Runtime")
        except Exception as exc:  # report, do not hide, a path this machine cannot run (onnxruntime missing)
            rows["onnx export"] = f"unavailable: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
        if args.alternatives:
            for name, result in alternatives(fast, texts).items():
                rows[name] = (*result, "merged, token-budget batches") if isinstance(result, tuple) else result
        write_rows(args, texts, gold, flops, ceiling, rows)
        if fast.device.type == "cuda" or args.alternatives:  # last: its compiling may take a GPU check's time
            try:
                rows["lightune compiled"] = compiled_path(run_dir, args.device, texts)
            except Exception as exc:  # report, do not hide, a path this machine cannot run
                rows["lightune compiled"] = f"unavailable: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
        write_rows(args, texts, gold, flops, ceiling, rows)

    report(args, texts, gold, lengths, fast, flops, ceiling, rows)
    return 0


def table(texts, gold, flops: float, ceiling: float, rows: dict) -> dict:
    """texts/s, seconds, GFLOP/s, share of the ceiling, accuracy and agreement with the common recipe per row."""
    common_p = rows["common"][1]
    out = {}
    for name, row in rows.items():
        if isinstance(row, str):
            out[name] = {"unavailable": row}
            continue
        seconds, probs, how = row
        out[name] = {"texts_per_s": len(texts) / seconds, "seconds": seconds, "gflop_per_s": flops / seconds / 1e9,
                     "of_fp32_ceiling": flops / seconds / ceiling,
                     "accuracy": float((probs.argmax(-1) == gold).float().mean()),
                     "same_label": float((probs.argmax(-1) == common_p.argmax(-1)).float().mean()), "how": how}
    return out


def write_rows(args, texts, gold, flops: float, ceiling: float, rows: dict) -> None:
    if args.json:
        import json

        with open(args.json + ".tmp", "w") as fh:
            json.dump({"args": vars(args), "texts": len(texts), "useful_flops": flops, "fp32_ceiling": ceiling,
                       "rows": table(texts, gold, flops, ceiling, rows)}, fh, indent=2)
        os.replace(args.json + ".tmp", args.json)


def report(args, texts, gold, lengths, fast, flops: float, ceiling: float, rows: dict) -> None:
    common_s, common_p, _ = rows["common"]
    print(f"\n{len(texts)} {args.data} texts ({sum(lengths) / len(lengths):.0f} tokens on average), "
          f"device {fast.device.type}, max_length {fast.max_length}")
    print(f"matrix-product ceiling (fp32, {fast.model.config.hidden_size} x {fast.model.config.intermediate_size}): "
          f"{ceiling / 1e9:.1f} GFLOP/s")
    print(f"{'recipe':<18} {'texts/s':>8} {'seconds':>8} {'GFLOP/s':>8} {'of fp32 ceiling':>15} {'accuracy':>9} "
          f"{'same label':>10}")
    for name, row in table(texts, gold, flops, ceiling, rows).items():
        if "unavailable" in row:
            print(f"{name:<18} {row['unavailable']}")
            continue
        print(f"{name:<18} {row['texts_per_s']:>8.1f} {row['seconds']:>8.1f} {row['gflop_per_s']:>8.1f} "
              f"{row['of_fp32_ceiling']:>15.0%} {row['accuracy']:>9.4f} {row['same_label']:>10.1%}   {row['how']}")
    fast_s, fast_p, _ = rows["lightune"]
    print(f"speed-up (lightune / common): {common_s / fast_s:.2f}x; max probability difference "
          f"{float((common_p - fast_p).abs().max()):.2e}; a path at the ceiling would be "
          f"{ceiling / (flops / common_s):.2f}x the common recipe")
    if isinstance(rows.get("onnx export"), tuple):
        onnx_s, onnx_p, _ = rows["onnx export"]
        print(f"ONNX Runtime / PyTorch (lightune): {fast_s / onnx_s:.2f}x the speed; max probability difference "
              f"{float((onnx_p - fast_p).abs().max()):.2e}")
    for name in ("lightune fp32", "lightune compiled", "pipeline bf16"):
        if isinstance(rows.get(name), tuple):
            print(f"{name} / common: {common_s / rows[name][0]:.2f}x the speed")


if __name__ == "__main__":
    sys.exit(main())
