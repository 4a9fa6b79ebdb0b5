#!/usr/bin/env bash
# The whole GPU check in one go, on a machine with an NVIDIA GPU:
#   1. builds with CUDA (warnings as errors) into its own build directory;
#   2. runs the tests labelled `cuda` with MORPHSERVE_REQUIRE_GPU=1, so that
#      a test that cannot see the GPU fails instead of skipping;
#   3. runs the rest of the suite;
#   4. runs the GPU benchmarks: every bench_cuda_* binary the build made,
#      each with --json DIR/gpu-check/NAME.json, and bench_cuda_decode once
#      more under MorphKV (the cost of its scoring against `full`);
#   5. prints a summary table (markdown).
#
#   scripts/gpu-check.sh [--build-dir DIR] [-- extra cmake configure args]
#
# CUDA architectures default to the project's (80 90); set
# MORPHSERVE_CUDA_ARCHS (e.g. "90") to build fewer. Logs and JUnit reports
# land in DIR/gpu-check/. Exits non-zero when the build or any test fails.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
build="$root/build-gpu"
cmake_args=()
while (($#)); do
  case "$1" in
    --build-dir) build=$(realpath -m -- "$2"); shift 2 ;;
    --) shift; cmake_args+=("$@"); break ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
if [[ -x /usr/local/cuda/bin/nvcc ]] && ! command -v nvcc >/dev/null; then
  export PATH="/usr/local/cuda/bin:$PATH"
fi
if [[ -n "${MORPHSERVE_CUDA_ARCHS:-}" ]]; then
  cmake_args+=("-DCMAKE_CUDA_ARCHITECTURES=$MORPHSERVE_CUDA_ARCHS")
fi
logs="$build/gpu-check"

device="none visible"
if command -v nvidia-smi >/dev/null; then
  device=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
    2>/dev/null | head -n 1) || device="nvidia-smi failed"
  [[ -n "$device" ]] || device="none visible"
else
  echo "[gpu-check] nvidia-smi not found: the cuda tests will fail" >&2
fi
commit=$(git -C "$root" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
if [[ -n "$(git -C "$root" status --porcelain --untracked-files=no 2>/dev/null)" ]]; then
  commit="$commit (with local changes)"
fi

echo "[gpu-check] configuring $build" >&2
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DMORPHSERVE_WERROR=ON \
  -DMORPHSERVE_WITH_CUDA=ON -DMORPHSERVE_BUILD_TESTS=ON -DMORPHSERVE_BUILD_BENCHMARKS=ON \
  "${cmake_args[@]}" >&2
echo "[gpu-check] building" >&2
cmake --build "$build" -j "$(nproc)" >&2
mkdir -p "$logs"

# Runs ctest with the given filter arguments; writes a JUnit report to
# $logs/$1.xml and the log to $logs/$1.log. Never fails the script itself.
run_ctest() {
  local name=$1
  shift
  echo "[gpu-check] ctest $*" >&2
  (cd "$build" && ctest --output-on-failure --output-junit "$logs/$name.xml" "$@") \
    >"$logs/$name.log" 2>&1 || true
  tail -n 5 "$logs/$name.log" >&2
}

# "passed failed skipped" from a JUnit report (or "- - -" when it is missing).
counts() {
  python3 - "$1" <<'PY'
import sys
import xml.etree.ElementTree as ET
try:
    suite = ET.parse(sys.argv[1]).getroot()
except (OSError, ET.ParseError):
    print("- - -")
    sys.exit()
total = int(suite.get("tests", 0))
failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
skipped = int(suite.get("skipped", 0)) + int(suite.get("disabled", 0))
print(total - failed - skipped, failed, skipped)
PY
}

# The cuda tests one at a time (they share the GPU); the rest in parallel.
MORPHSERVE_REQUIRE_GPU=1 run_ctest cuda -L cuda
MORPHSERVE_MODELS_DIR="${MORPHSERVE_MODELS_DIR:-$root/models}" \
  run_ctest other -LE cuda -j "$(nproc)"

# GPU benchmarks: binaries named bench_cuda_* (benchmarks/CMakeLists.txt adds
# them when MORPHSERVE_WITH_CUDA is on); each prints a table and writes its
# JSON report to $logs/.
benches=()
while IFS= read -r -d '' bench; do
  benches+=("$bench")
done < <(find "$build/bin" -maxdepth 1 -type f -name 'bench_cuda_*' -perm -u+x -print0 | sort -z)
bench_status="none built yet"
if ((${#benches[@]})); then
  bench_status="ok"
  for bench in "${benches[@]}"; do
    name=$(basename "$bench")
    echo "[gpu-check] $name" >&2
    if ! "$bench" --json "$logs/$name.json" | tee "$logs/$name.md" >&2; then
      bench_status="failed ($name)"
    fi
  done
  decode="$build/bin/bench_cuda_decode"
  if [[ -x "$decode" ]]; then
    echo "[gpu-check] bench_cuda_decode --kv-policy morphkv" >&2
    if ! "$decode" --kv-policy morphkv --kv-window 32 --batch-sizes 1,8,32,128 \
        --json "$logs/bench_cuda_decode_morphkv.json" |
        tee "$logs/bench_cuda_decode_morphkv.md" >&2; then
      bench_status="failed (bench_cuda_decode --kv-policy morphkv)"
    fi
  fi
  bench_status="$bench_status: ${#benches[@]} run, reports in $logs"
fi

read -r cuda_pass cuda_fail cuda_skip < <(counts "$logs/cuda.xml")
read -r other_pass other_fail other_skip < <(counts "$logs/other.xml")
echo
echo "| gpu-check | |"
echo "|---|---|"
echo "| device | $device |"
echo "| commit | $commit |"
echo "| tests labelled cuda | $cuda_pass passed, $cuda_fail failed, $cuda_skip skipped |"
echo "| all other tests | $other_pass passed, $other_fail failed, $other_skip skipped |"
echo "| GPU benchmarks | $bench_status |"
echo "| logs | $logs |"

ok=1
for n in "$cuda_fail" "$other_fail"; do
  [[ "$n" == "0" ]] || ok=0
done
[[ "$cuda_skip" == "0" ]] || ok=0  # nothing may skip on a GPU machine
[[ "$bench_status" != failed* ]] || ok=0
((ok))
