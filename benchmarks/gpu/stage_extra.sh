#!/bin/bash
# After ../shared/gpu/stage.sh: add to .gpu-stage/3 the serving wheels the GPU image lacks (FastAPI and what it
# imports), so that `lightune serve` and tests/test_serve_*.py run there too, for the three-call staging (with
# bitsandbytes, for QLoRA). The one-call check (check.sh) stages with stage_one.sh instead.
set -euo pipefail
root=$(git rev-parse --show-toplevel); cd "$root"
ver() { python3 -c "import importlib.metadata as m; print(m.version('$1'))"; }
reqs=$(for p in fastapi starlette uvicorn pydantic pydantic-core annotated-types typing-inspection opentelemetry-api; do
       echo "$p==$(ver $p)"; done)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu-stage/3 $reqs 2>&1 | grep -v '^WARNING: Location' || true
du -sb .gpu-stage/3
