#!/bin/sh
# The GPU proof in one command: the CUDA tests, the GPU save benchmark, the consistency check;
# results in benchmarks/results/<date>-gpu-<commit>.{md,json}. Without CUDA it runs a CPU mode
# that exercises the same code at tiny sizes and says it skipped the GPU. Options: gpu_check.py -h.
cd "$(dirname "$0")/.." || exit 1
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec python3 benchmarks/gpu_check.py "$@"
