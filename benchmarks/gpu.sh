#!/usr/bin/env bash
# The GPU figures of `medtune bench` (train and predict) in one call, most important first.
#
#   bash benchmarks/gpu.sh              # on a machine with an NVIDIA GPU, from the repo root
#
# Expects a Python that already has torch (CUDA), transformers, peft, accelerate, pandas, typer
# and rich. Packages it lacks can come as wheels in .whl/ (installed to /tmp/site first):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_24_x86_64 -d .whl \
#     bitsandbytes==0.50.2 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
# medtune itself runs from src/ (no install). Each benchmark writes OUT/<name>/bench_*.{json,md}
# and OUT/<name>.log; a failing or timed-out one does not stop the next.
#
# Settings (environment): OUT (default runs/gpu), ARCHS (full-size random models for the train
# rows, default "gemma-2b llama-2-7b"), LAYERS (0: all of the preset's layers), STEPS (12),
# BATCH (16), N (notes for predict, 200), LIMIT (seconds per benchmark, 240), WHEELS (.whl),
# TAR (an archive of OUT, rewritten after each benchmark). Order: train and predict on the first
# of ARCHS, train and predict on the embedded model, train on the other ARCHS.
# A CPU dry run of the whole script (the venv active, its packages, ~8 min):
#   WHEELS=none LAYERS=1 STEPS=3 BATCH=2 N=8 ARCHS=gemma-2b LIMIT=900 bash benchmarks/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
ARCHS=${ARCHS:-gemma-2b llama-2-7b}
LAYERS=${LAYERS:-0}
STEPS=${STEPS:-12}
BATCH=${BATCH:-16}
N=${N:-200}
LIMIT=${LIMIT:-240}
mkdir -p "$OUT"
WHEELS=${WHEELS:-.whl}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export MEDTUNE_CACHE=${MEDTUNE_CACHE:-/tmp/medtune-cache} TOKENIZERS_PARALLELISM=false
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  python3 - <<'EOF'
import importlib
for name in ("torch", "transformers", "peft", "bitsandbytes", "trl", "accelerate"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:  # report and go on: the benchmark that needs it will fail by itself
        print(name, "missing:", exc)
import torch
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
} 2>&1 | tee "$OUT/versions.txt"

bench() {  # bench NAME KIND ARGS...: one benchmark, its table printed, its failure reported
  local name=$1 kind=$2 start=$SECONDS
  shift 2
  echo "== $name: medtune bench $kind $*"
  timeout "$LIMIT" python3 -m medtune bench "$kind" -o "$OUT/$name" --overwrite "$@" \
    >"$OUT/$name.log" 2>&1
  local rc=$?
  if [ -f "$OUT/$name/bench_$kind.md" ] && [ $rc -eq 0 ]; then
    cat "$OUT/$name/bench_$kind.md"
  else
    echo "FAILED (exit $rc):"
    grep -v "Loading weights\|Writing model" "$OUT/$name.log" | tail -15
  fi
  echo "($name: $((SECONDS - start)) s)"
  # TAR=FILE: everything so far in one archive (a caller that can fetch only a few files)
  if [ -n "${TAR:-}" ]; then tar czf "$TAR" -C "$OUT" .; fi
}

layers=()
[ "$LAYERS" != 0 ] && layers=(--layers "$LAYERS")
sides=(--sides medtune,trl,trl_fp32,baseline)
if ! python3 -c "import trl" >/dev/null 2>&1; then  # e.g. datasets wants a newer pyarrow
  echo "trl does not import here: the TRL sides are left out"
  sides=(--sides medtune,baseline)
fi
set -- $ARCHS
first=${1:-gemma-2b}
bench "train-$first" train --vocab none --arch "$first" "${layers[@]}" --steps "$STEPS" \
  --batch-size "$BATCH" "${sides[@]}"
bench "predict-$first" predict --arch "$first" "${layers[@]}" --n "$N"
bench train-embedded train --steps "$STEPS" --batch-size "$BATCH" "${sides[@]}"
bench predict-embedded predict --n "$N"
for arch in "${@:2}"; do
  bench "train-$arch" train --vocab none --arch "$arch" "${layers[@]}" --steps "$STEPS" \
    --batch-size "$BATCH" "${sides[@]}"
done
