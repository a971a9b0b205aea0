#!/usr/bin/env bash
# Creates .venv/ in the checkout and installs aim_ds with everything it needs (CPU machine).
# torch is pinned and installed FIRST: resolving deepspeed or transformers before it pulls a
# multi-GB CUDA build of torch. Idempotent: a second run only re-checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==${AIM_DS_TORCH:-2.13.0}"
.venv/bin/python -m pip install -q -e ".[test,mpi,hf]"
# DeepSpeed JIT-compiles its CPU communication op on first use (~45-100 s): do it here, once, into
# the same cache the runs and tests use, so the first training run does not pay for it.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
.venv/bin/python -c "from aim_ds.distributed import prebuild_ops; print('prebuilt ops:', prebuild_ops())"
.venv/bin/python - <<'PY'
import torch, deepspeed, transformers
print(f"aim_ds environment ready: torch {torch.__version__}, deepspeed {deepspeed.__version__}, "
      f"transformers {transformers.__version__}")
PY
