#!/usr/bin/env bash
# The checks only a CUDA machine can run, in one command (CI has none: it runs .ci/run on CPU).
#   bash scripts/gpu_check.sh [OUT_DIR]
# 1. every test marked `gpu`: the CUDA graph equals eager (centralized, LocalSGD, SlowMo+AdamW,
#    LocalSGD+LAMB, ResNet-20 bf16), recapture after an optimizer restart, no host synchronisation
#    inside the training steps or the optimizers' steps, the device augmentation;
# 2. the benchmark on the GPU: step, local (vmap vs loop) and limit (end-to-end epochs against the
#    same maths captured in one CUDA graph, fp32 and bf16, per engine.compile mode) and layout
#    (channels_last vs contiguous: whether engine.memory_format=auto should pick channels_last on CUDA)
#    and pack (a sweep of 8 seeds packed into one process vs run serially; goal >= 4x).
# Both logs land in OUT_DIR (default: gpu-check/). Needs torch with CUDA, hydra-core and omegaconf
# (mlflow and optuna are not needed: the benchmark and these tests log nothing).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu-check}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device is visible')" || exit 1
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" | tee "$out/device.txt"
python -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$out/tests.log"
tests=${PIPESTATUS[0]}
python -m dpl.bench --device cuda step local limit layout pack 2>&1 | tee "$out/bench.log"
bench=${PIPESTATUS[0]}
echo "gpu tests: exit $tests; bench: exit $bench"
exit $(( tests != 0 || bench != 0 ))
