#!/usr/bin/env bash
# B1 on one GPU: every method of ours and plain PyTorch (python -m benchmarks.gpu), forward-over-reverse
# against reverse-over-reverse on the transformer (benchmarks.second_order), then the tests that need or
# concern a GPU, into one markdown report, OUT/b1_gpu.md (with b1_gpu.json, second_order.json, tests.txt).
# Under 5 minutes on one H200. Installs nothing: it stops, saying what is missing.
#
#   benchmarks/gpu.sh OUT_DIR                  (or OUT=DIR benchmarks/gpu.sh)
#   benchmarks/gpu.sh --cpu-dry-run OUT_DIR    the same plumbing on CPU, T = 5, scikit-learn's digits
#
# PYTHON names the interpreter (default: python).
set -euo pipefail

die() { echo "gpu.sh: $*" >&2; exit 1; }

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
dry=0
if [[ ${1:-} == --cpu-dry-run ]]; then dry=1; shift; fi
out=${1:-${OUT:-}}
[[ -n $out ]] || die "usage: gpu.sh [--cpu-dry-run] OUT_DIR (or set OUT)"
mkdir -p "$out"
out=$(cd "$out" && pwd)
python=${PYTHON:-python}
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
cd "$root"

if (( dry )); then
    device=cpu
    sizes=(--steps 5 --repeats 1 --digits)
    second=(--steps 2 --checkpoint-every 1 --repeats 1)
    "$python" -c "import torch" 2>/dev/null || { sizes+=(--no-torch); echo "gpu.sh: no PyTorch here: the dry run skips it" >&2; }
    tests=(tests/test_gpu.py)
else
    device=gpu
    sizes=(--steps 100 --repeats 5)
    second=(--steps 10 --checkpoint-every 5 --repeats 3)
    command -v nvidia-smi >/dev/null || die "no nvidia-smi: no NVIDIA GPU on this machine (--cpu-dry-run checks the plumbing on CPU)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$out/gpu.txt" \
        || die "nvidia-smi failed: no usable GPU"
    "$python" -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' \
        || die "JAX sees no GPU (backend: $("$python" -c 'import jax; print(jax.default_backend())')); install it with: pip install -U \"jax[cuda12]\" (or \"jax[cuda13]\")"
    "$python" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null \
        || die "PyTorch with CUDA is missing (plain PyTorch is the reference row); install a CUDA build of torch"
    data=${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
    [[ -e $data/train-images-idx3-ubyte.gz ]] \
        || die "Fashion-MNIST not found in $data (apt-get install dataset-fashion-mnist, or set FASHION_MNIST_DIR)"
    tests=(tests/test_gpu.py tests/test_fixedpoint.py tests/test_reversible.py)
fi

echo "gpu.sh: B1 on $device ..." >&2
timeout 270 "$python" -m benchmarks.gpu --out "$out" --device "$device" "${sizes[@]}"

echo "gpu.sh: forward-over-reverse against reverse-over-reverse on the transformer ..." >&2
set +e
timeout 180 "$python" -m benchmarks.second_order --only Transformer "${second[@]}" --out "$out/second_order.json" \
    > "$out/second_order.txt" 2>&1
second_rc=$?
set -e
printf '\nSecond-order products on the transformer (`python -m benchmarks.second_order --only Transformer %s`, rc %s):\n\n```\n%s\n```\n' \
    "${second[*]}" "$second_rc" "$(grep -E '^Transformer' "$out/second_order.txt" || tail -n 3 "$out/second_order.txt")" >> "$out/b1_gpu.md"

echo "gpu.sh: tests ${tests[*]} ..." >&2
set +e
timeout 150 "$python" -m pytest -q -p no:cacheprovider "${tests[@]}" > "$out/tests.txt" 2>&1
rc=$?
set -e
summary=$(tail -n 1 "$out/tests.txt")
(( rc == 124 )) && summary="timed out after 150 s ($summary)"
printf '\nTests on this machine (`pytest %s`): %s\n' "${tests[*]}" "$summary" >> "$out/b1_gpu.md"
cat "$out/b1_gpu.md"
exit "$rc"
