#!/usr/bin/env bash
# First light on a lent GPU machine, in one call of at most 9 minutes:
#
#   bash bench/gpu_session.sh             build, GPU tests, compute-sanitizer, benches, GPT and
#                                         CIFAR --kernels auto vs off -> $OUT/summary.{json,md}
#   bash bench/gpu_session.sh --dry-run   the same stages on a CPU at tiny shapes
#
# No install step: the machine's own torch/triton/CUDA are used, the repository is put on
# PYTHONPATH and the extension is built in place.  The stages, their budgets and the
# summary are described in bench/gpu_session.py (python -m bench.gpu_session --help).
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m bench.gpu_session "$@"
