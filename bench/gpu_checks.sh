#!/usr/bin/env bash
# Every GPU check of the fast path, in one go on an NVIDIA GPU machine. Each step has a timeout; together at most
# 540 s, so a 10-minute job limit always returns the files.
# Run it on the GPU machine from the repo root, with .whl copied beside it (see docs/PERFORMANCE.md):
#   bash bench/gpu_checks.sh
# Prints the comparison table last; full JSON goes to $OUT. Rehearse on a CPU with DRY=1
# (tiny model, CPU, minutes of work cut to seconds).
set -uo pipefail
PY=${PY:-python3}
OUT=${OUT:-/tmp/nasq-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
if [ "${DRY:-0}" = 1 ]; then DEV=cpu; PREC=fp32; ARCH=tiny; SIZES=1,4; IMAGES=64; BUDGET=60
else DEV=cuda:0; PREC=fp16; ARCH=large; SIZES=1,8,64,128,256; IMAGES=2000; BUDGET=110; fi
nvidia-smi -L 2>/dev/null; $PY -c "import torch; print('torch', torch.__version__, torch.cuda.is_available())"

step() { echo; echo "=== $1 ($(date +%T))"; }
step "baseline (bench/gpu_baseline.py, same card, same run)"
PROBE_BUDGET_S=$BUDGET timeout 130 $PY bench/gpu_baseline.py > "$OUT/baseline.log" 2>&1; tail -20 "$OUT/baseline.log"
step "nasq bench: $PREC, CUDA graphs, compute"
timeout 80 $PY -m nasq.cli bench --device $DEV --precision $PREC --arch $ARCH --batch-sizes $SIZES \
  $([ $DEV = cpu ] || echo --cuda-graphs) --min-time 1 --json "$OUT/bench_graphs.json"
step "nasq bench: $PREC, torch.compile with freezing (compile time counts against the budget)"
[ $DEV = cpu ] || timeout 110 $PY -m nasq.cli bench --device $DEV --precision $PREC --arch $ARCH \
  --batch-sizes 64 --compile default --no-baseline --min-time 1 --json "$OUT/bench_compile.json"
step "nasq bench: end to end from JPEGs"
timeout 40 $PY -m nasq.cli bench --device $DEV --precision $PREC --arch $ARCH --batch-sizes 64 --mode e2e \
  $([ $DEV = cpu ] || echo --cuda-graphs) --no-baseline --min-time 3 --json "$OUT/bench_e2e.json"
step "nasq bench: end to end, JPEGs decoded on the GPU (nvjpeg)"
[ $DEV = cpu ] || timeout 40 $PY -m nasq.cli bench --device $DEV --precision $PREC --arch $ARCH --batch-sizes 64,256 \
  --mode e2e --cuda-graphs --device-decode --no-baseline --min-time 3 --json "$OUT/bench_e2e_nvjpeg.json"
step "accuracy: fast path vs fp32 reference"
timeout 80 $PY bench/gpu_accuracy.py --images $IMAGES --arch $ARCH --device $DEV \
  --precisions $([ $DEV = cpu ] && echo fp32 || echo fp16,bf16)
step "nasq eval with a $PREC worker (embedded: private Redis + one worker per GPU)"
ACC=~/.cache/nasq/acc-$ARCH-$IMAGES
timeout 60 $PY -m nasq.cli eval $([ $DEV = cpu ] || echo --cuda-graphs) --weights $ACC/nasnetalarge-random-$ARCH.pth \
  --data $ACC/val --labels $ACC/val_label.txt --precision $PREC --batch-size 64 --device $([ $DEV = cpu ] && echo cpu || echo cuda) \
  --no-progress --json "$OUT/eval.json"
echo; echo "=== done $(date +%T); files in $OUT"
