#!/usr/bin/env bash
# One script for a machine with one CUDA GPU, after `make venv` (it installs nothing): the CUDA tests, inference
# latency at 1036 px (FP32, fp16, bf16; ours and anomalib's L2BT), fit + test as users run them at 1036 px on the
# generated demo data (3 epochs), in the trainer precisions 32-true and bf16-mixed, and tiled inference of a
# 2048 x 2448 image; it ends with one Markdown table.
# Planned to take under 10 minutes (the wall time is printed last). Teachers have random weights (offline).
#
#   bash benchmarks/gpu.sh                  # defaults of benchmarks/gpu.py
#   bash benchmarks/gpu.sh --epochs 5       # any option of benchmarks/gpu.py (see its --help)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python=.venv/bin/python

if [[ ! -x "$python" ]]; then
    echo "gpu.sh: $python not found: run 'make venv' in $(pwd) first." >&2
    exit 1
fi
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu.sh: no CUDA GPU visible to PyTorch (torch.cuda.is_available() is False): run it on a machine with" \
        "an NVIDIA GPU and its driver (nvidia-smi lists it), with a CUDA build of torch in .venv." \
        "To check the script's steps on a CPU: $python benchmarks/gpu.py --device cpu --help" >&2
    exit 2
fi
exec "$python" benchmarks/gpu.py --device cuda "$@"
