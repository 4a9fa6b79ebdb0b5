#!/usr/bin/env bash
# Single-sequence CPU throughput on the default model, side by side with
# llama.cpp's llama-bench on the same file and thread count.
#   scripts/bench_cpu.sh [--threads N] [--no-llama-cpp]
# llama-bench is built once from the llama-cpp-python source package (which
# carries llama.cpp's sources) into .cache/llama.cpp; nothing of it is kept
# in the repository. Prints a markdown table.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
threads=2
with_llama=1
while (($#)); do
  case "$1" in
    --threads) threads=$2; shift 2 ;;
    --no-llama-cpp) with_llama=0; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
model="$root/models/SmolLM2-135M-Instruct.Q4_1.gguf"
[[ -f "$model" ]] || "$root/scripts/fetch_model.sh"
[[ -x "$root/build/bin/bench_forward" ]] || "$root/scripts/build.sh"

echo "[bench] morphserve, $threads threads" >&2
ours=$("$root/build/bin/bench_forward" --model "$model" --threads "$threads" \
  --prompt-tokens 512 --gen-tokens 128 --repeats 5 --json)

row() { printf '| %s | %s | %s | %s |\n' "$@"; }
echo "| engine | pp512 tok/s | tg128 tok/s | peak RSS MiB |"
echo "|---|---:|---:|---:|"
python3 - "$ours" <<'PY'
import json, sys
d = json.loads(sys.argv[1])
print(f"| morphserve | {d['prefill_tokens_per_s']:.1f} | {d['decode_tokens_per_s']:.1f} | {d['peak_rss_mib']:.0f} |")
PY

if ((with_llama)); then
  cache="$root/.cache/llama.cpp"
  bench="$cache/build/bin/llama-bench"
  if [[ ! -x "$bench" ]]; then
    echo "[bench] building llama-bench from the llama-cpp-python sdist" >&2
    mkdir -p "$cache"
    python3 -m pip download --quiet --no-deps --no-binary :all: --dest "$cache" llama-cpp-python
    tar -xzf "$cache"/llama_cpp_python-*.tar.gz -C "$cache"
    src=$(ls -d "$cache"/llama_cpp_python-*/vendor/llama.cpp)
    cmake -S "$src" -B "$cache/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
      -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >&2
    cmake --build "$cache/build" --target llama-bench -j "$(nproc)" >&2
  fi
  echo "[bench] llama.cpp llama-bench, $threads threads" >&2
  # Run from Python so that its peak RSS is measured like bench_forward's (getrusage).
  python3 - "$bench" "$model" "$threads" <<'PY'
import json, resource, subprocess, sys
bench, model, threads = sys.argv[1:4]
out = subprocess.run([bench, "-m", model, "-t", threads, "-p", "512", "-n", "128", "-r", "5",
                      "-o", "json"], check=True, capture_output=True, text=True).stdout
rss_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
rows = {("pp" if r["n_prompt"] else "tg"): r for r in json.loads(out)}
print(f"| llama.cpp llama-bench | {rows['pp']['avg_ts']:.1f} | {rows['tg']['avg_ts']:.1f} "
      f"| {rss_mib:.0f} |")
PY
fi
