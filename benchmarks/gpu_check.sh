#!/usr/bin/env bash
# One-GPU check of the AimMerging plugin, at most 8 minutes on one H200 (see benchmarks/gpu_check.py):
# a ZeRO-3 bf16 run of a ~1.1B-parameter Llama built from a config (deepspeed launcher, 1 rank), merging
# on; reports step time, probe cost, fusion bandwidth against a device copy, the plugin's device memory
# and peak memory as JSON in $OUT/gpu_check.json ($OUT set) or ./gpu_check.json.
#
#   bash benchmarks/gpu_check.sh                  # on the GPU machine, from anywhere in the repo
#   bash benchmarks/gpu_check.sh --cpu            # the same path on the CPU with a small model (tested)
#   bash benchmarks/gpu_check.sh --fetch-wheels   # on a machine with PyPI: put DeepSpeed (sdist) and the
#                                                 # packages a bare GPU image lacks into .whl/ (git-ignored)
# Extra arguments go to gpu_check.py (e.g. --anchor-host, --steps 5).
#
# A GPU image without DeepSpeed: with .whl/ present, DeepSpeed is installed from it into /tmp/aim_site
# (no network, no CUDA ops built: the run uses torch's AdamW, so no JIT op build is needed either).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
if [[ -x .venv/bin/python ]]; then PY=${PYTHON:-.venv/bin/python}; else PY=${PYTHON:-python3}; fi

# versions pinned to the ones this repo's CPU environment was tested with
WHEELS=(hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5)
DEEPSPEED=deepspeed==0.19.8

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  mkdir -p .whl
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}"
  "$PY" -m pip download -q --no-deps --no-binary=:all: -d .whl "$DEEPSPEED"
  ls -la .whl
  exit 0
fi

START=$(date +%s)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$REPO/.cache/torch_extensions}
if ! "$PY" -c "import deepspeed, pydantic, hjson" >/dev/null 2>&1; then
  if compgen -G ".whl/*" >/dev/null; then
    echo "gpu_check: installing DeepSpeed from .whl/ into /tmp/aim_site" >&2
    DS_BUILD_OPS=0 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir \
      --target /tmp/aim_site .whl/*
    export PYTHONPATH=/tmp/aim_site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "gpu_check: DeepSpeed is not importable and there is no .whl/ folder;" \
         "run 'bash benchmarks/gpu_check.sh --fetch-wheels' where PyPI is reachable and carry .whl/" >&2
    exit 2
  fi
fi
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}

OUT_JSON="${OUT:-.}/gpu_check.json"
PORT=$("$PY" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
LEFT=$(( 480 - ($(date +%s) - START) - 10 ))
echo "gpu_check: $("$PY" -c 'import torch, deepspeed; print("torch", torch.__version__, "deepspeed", deepspeed.__version__, "cuda", torch.cuda.is_available())')" >&2
# deepspeed launcher, one rank; --num_gpus is ignored on the CPU accelerator (one rank there too)
timeout --kill-after=10 "$LEFT" "$PY" -m deepspeed.launcher.runner --num_gpus 1 --master_port "$PORT" \
  benchmarks/gpu_check.py --out "$OUT_JSON" "$@"
echo "gpu_check: done in $(( $(date +%s) - START )) s; JSON in $OUT_JSON" >&2
