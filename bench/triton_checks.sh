#!/usr/bin/env bash
# The GPU checks of the fused separable convolutions (Triton), in one go on an NVIDIA GPU machine. Each step
# has a timeout, together at most 520 s plus the wheel install, so a 10-minute job limit returns
# the files; every step's output is also kept in $OUT. Baselines are measured in the same run
# (torch's kernels, eager and compiled), so every figure is a ratio on one card.
# Run it on the GPU machine from the repo root, with .whl copied beside it (see docs/PERFORMANCE.md):
#   bash bench/triton_checks.sh
# Rehearse on a CPU with DRY=1 (tiny model, Triton's interpreter, batch 1; about 10 minutes, as
# the interpreter runs the tiny model in ~25 s a pass; its numbers mean nothing).
set -uo pipefail
PY=${PY:-python3}
OUT=${OUT:-/tmp/nasq-triton}
mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
if [ "${DRY:-0}" = 1 ]; then
  export TRITON_INTERPRET=1; DEV=cpu; PREC=fp32; ARCH=tiny; SIZES=1; WHOLE=1; IMAGES=2; BS=2; MIN=0.05; DRYRUN=1
  T_STACK=200; T_WHOLE=420; T_ACC=150
else
  # largest first: a timeout cuts the least important size
  DEV=cuda:0; PREC=fp16; ARCH=large; SIZES=256,64,1; WHOLE=256,64; IMAGES=500; BS=64; MIN=0.3; DRYRUN=0
  T_STACK=200; T_WHOLE=130; T_ACC=60
fi
nvidia-smi -L 2>/dev/null; $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.is_available())"

step() { echo; echo "=== $1 ($(date +%T))"; }
step "separable stacks: Triton vs torch eager and torch.compile with freezing, batch $SIZES"
timeout $T_STACK $PY bench/triton_sep.py --device $DEV --precision $PREC --arch $ARCH --sizes $SIZES --min-time $MIN \
  --budget $((T_STACK - 50)) $([ $DRYRUN = 1 ] || echo --compile) 2>&1 | tee "$OUT/stacks.log"
step "whole model, torch kernels: torch.compile with freezing + CUDA graphs, batch $WHOLE"
[ $DRYRUN = 1 ] || timeout $T_WHOLE $PY -m nasq.cli bench --device $DEV --precision $PREC --arch $ARCH \
  --batch-sizes $WHOLE --compile default --cuda-graphs --no-baseline --min-time 1 --json "$OUT/bench_compile.json" \
  2>&1 | tee "$OUT/whole_torch.log"
step "whole model, --kernels triton (+ compile with freezing + CUDA graphs on the GPU), batch $WHOLE"
timeout $T_WHOLE $PY -m nasq.cli bench --device $DEV --precision $PREC --arch $ARCH --batch-sizes $WHOLE \
  --kernels triton $([ $DRYRUN = 1 ] || echo --compile default --cuda-graphs) --no-baseline --min-time 1 \
  --json "$OUT/bench_triton.json" 2>&1 | tee "$OUT/whole_triton.log"
step "top-1 agreement with fp32 (--kernels triton)"
timeout $T_ACC $PY bench/gpu_accuracy.py --images $IMAGES --arch $ARCH --device $DEV --batch-size $BS \
  --precisions $PREC --options "{\"kernels\": \"triton\"$([ $DRYRUN = 1 ] || echo ', "cuda_graphs": true')}" \
  2>&1 | tee "$OUT/accuracy.log"
echo; echo "=== done $(date +%T); files in $OUT"
