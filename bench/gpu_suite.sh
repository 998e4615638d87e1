#!/usr/bin/env bash
# One command for a GPU machine (it has torch, triton, cupy, ninja; nothing is downloaded):
# install rmtkd in place, build the C++ extension (timed: the JIT build of csrc/, cached under
# $RMTKD_CACHE or ~/.cache/rmtkd), run one small call of each CUDA op under compute-sanitizer
# memcheck, run the GPU tests, then the three GPU benchmarks (torch, triton and cuda side by
# side), and print one summary table last. Budget: under 8 minutes on an H100. Results: bench/results/*.json
# (also copied to $OUT when that is set, as on the lent device machine).
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
stamp_file=$(mktemp)
status=0

python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: run the CPU suite (make test) instead')" || exit 2
nvidia-smi -L || true
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"

# rmtkd/csrc is mapped from csrc/ by the package metadata: install in place.
python -m pip install -q --no-deps --no-build-isolation -e . >/tmp/rmtkd-install.log 2>&1 \
  || { echo "editable install failed:"; tail -5 /tmp/rmtkd-install.log; exit 2; }
python -c "import rmtkd, rmtkd.kernels" || exit 2

step() {  # step NAME TIMEOUT CMD...
  local name=$1 limit=$2; shift 2
  echo; echo "=== $name (limit ${limit}s) ==="
  local t0=$(date +%s)
  timeout "$limit" "$@"; local rc=$?
  echo "=== $name: exit $rc in $(( $(date +%s) - t0 ))s ==="
  [ $rc -eq 0 ] || status=1
}

step "build C++ extension" 240 python -c "
import time
t0 = time.perf_counter()
from rmtkd.ops import cuda_ext
path = cuda_ext.load_extension(with_cuda=True)
print(f'rmtkd C++ extension: {path} built/loaded in {time.perf_counter() - t0:.1f} s')"
sanitizer=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" 2>/dev/null)
if [ -n "$sanitizer" ]; then
  # --report-api-errors no: torch's own start-up probes return CUDA errors it handles itself.
  step "compute-sanitizer memcheck" 150 "$sanitizer" --tool memcheck --error-exitcode 1 \
    --report-api-errors no python bench/sanitize_cuda.py
else
  echo "compute-sanitizer not found: memcheck step skipped"
fi
step "GPU tests" 150 python -m pytest -q -m gpu -p no:cacheprovider tests
step "bench covariance" 100 python bench/bench_covariance.py
step "bench projected linear" 100 python bench/bench_projected_linear.py
step "bench eigen" 120 python bench/bench_eigen.py

echo; echo "=== summary ($(( $(date +%s) - start ))s in all) ==="
python bench/summarize_gpu.py --newer-than "$stamp_file" || status=1
if [ -n "${OUT:-}" ]; then
  find bench/results -name '*.json' -newer "$stamp_file" -exec cp {} "$OUT"/ \;
fi
exit $status
