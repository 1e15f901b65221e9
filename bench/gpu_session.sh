#!/usr/bin/env bash
# Everything that needs a GPU, in stages that each fit a 10-minute call on a lent machine
# (which has torch, triton and the CUDA toolkit but no network, so nothing is installed:
# the extension is built in place and the repository is put on PYTHONPATH).
#
#   bash bench/gpu_session.sh STAGE [STAGE ...]      outputs under $OUT (default runs/gpu-session)
#
# Stages:
#   build      compile kernels._C in place for sm_90a; python -m kernels
#   test       the GPU-marked tests (bf16, the CUDA backend, cross-checks against cuBLAS,
#              FlexAttention, torch.compile)
#   sanitize   compute-sanitizer memcheck over the CUDA-extension tests
#   bench      python -m bench: every kernel against its competitors -> $OUT/bench/<device>/
#   gpt        60 steps of the record config on this GPU, --kernels auto and off, profiled
#   cifar      the CIFAR recipe, 5 runs each with --kernels auto and off, on synthetic data
# Each stage's log is $OUT/<stage>.log; a failing stage does not stop the next one, and
# the exit status is the number of stages that failed.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-session}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

stage_build() {
  nvidia-smi
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  python setup.py build_ext --inplace && python -m kernels
}
stage_test() { python -m pytest -q -m gpu -p no:cacheprovider; }
stage_sanitize() {
  compute-sanitizer --tool memcheck --target-processes all \
    python -m pytest -q -m gpu -p no:cacheprovider tests/test_softcap_ce.py tests/test_fp8_head.py -k "cuda or CUDA"
}
stage_bench() { python -m bench --out "$OUT/bench"; }
stage_gpt() {
  # The synthetic val split (1M tokens) fits 3 validation passes of 262,144 tokens.
  local common=(--preset record --steps 60 --val-every 0 --val-tokens 786432 --profile --profile-steps 40:43)
  python -m speedrun.gpt "${common[@]}" --kernels auto --run-dir "$OUT/gpt-auto" &&
    python -m speedrun.gpt "${common[@]}" --kernels off --run-dir "$OUT/gpt-off"
}
stage_cifar() {
  python -m speedrun.cifar --runs 5 --kernels auto --run-dir "$OUT/cifar-auto" &&
    python -m speedrun.cifar --runs 5 --kernels off --run-dir "$OUT/cifar-off"
}

if [ $# -eq 0 ]; then
  sed -n '2,19p' "$0"
  exit 2
fi
failed=0
for stage in "$@"; do
  if ! declare -F "stage_$stage" > /dev/null; then
    echo "unknown stage: $stage (build, test, sanitize, bench, gpt, cifar)" >&2
    exit 2
  fi
  echo "== $stage -> $OUT/$stage.log"
  start=$(date +%s)
  if "stage_$stage" > "$OUT/$stage.log" 2>&1; then status=ok; else status=FAILED; failed=$((failed + 1)); fi
  echo "   $status in $(( $(date +%s) - start )) s"
  tail -n 5 "$OUT/$stage.log"
done
exit "$failed"
