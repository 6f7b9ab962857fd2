#!/usr/bin/env bash
# The check of the CUDA path, for a machine with one CUDA GPU (about 6-8 minutes on a current GPU):
#   1. the CUDA tests: fp16 autocast sampling of the tiny model against CPU float32 (every sampler, img2img),
#      tiled decode, safety checker, watermark, and that no CPU-only machinery runs (tests/test_cuda.py);
#   2. speed against diffusers and diffusers + torch.compile, UNet step and txt2img 512x512 at 50 steps, batch 1
#      and 4, on full-size deterministic weights (scripts/gpu_check.py) -> docs/gpu-check.md and .json.
# Run it from a set-up checkout (README: Set-up): bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "gpu_check.sh: no CUDA GPU is visible to torch; nothing to check" >&2; exit 1; }
mkdir -p docs
python -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee docs/gpu-check-tests.txt
python scripts/gpu_check.py "$@"
