#!/usr/bin/env bash
# The README's GPU figures in one run: under 10 minutes on one H100, installing nothing (the project and
# its dependencies, with a CUDA build of torch, must already be importable).
#
#   bash bench/gpu.sh                      # on the GPU machine
#   GPU_BENCH_SMOKE=1 bash bench/gpu.sh    # every step at toy sizes on CPU: checks the script itself
#
# Prints each table and writes bench/results/gpu-<time>/ : one JSON per benchmark plus gpu.json, all of
# them with the device and versions. A step that fails or runs out of its time is reported and the next
# one still runs; the exit status says whether all of them finished.
#   1. training tokens/s and MFU, minimind2-small and minimind2, bf16, eager and compiled, vs transformers' Llama
#   2. greedy decoding tokens/s at batch 1 and 16 (fp32 and bf16 weights, eager and --compile on: CUDA graphs) vs HF generate
#   3. Ray Serve throughput at 1 and 16 streaming clients
#   4. the same clients against vLLM through Ray Serve LLM (jobs/serve.py --engine vllm); skipped, and said so,
#      where vLLM is not installed
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
OUT=${OUT:-bench/results/gpu-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
export BENCH_RESULTS_DIR="$OUT" RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false

if [ -n "${GPU_BENCH_SMOKE:-}" ]; then
  TRAIN=(--presets tiny --dtypes bf16 --batch-size 2 --seq-len 64 --steps 1 --rounds 2 --device cpu)
  GENERATE=(--preset tiny --precisions fp32 bf16 --batch-sizes 1 2 --new-tokens 8 --prefill-len 32 --rounds 1 --no-cache-max-batch 0 --device cpu)
  SERVE=(--preset demo --clients 1 2 --max-tokens 8 --batch-sizes 4 --num-cpus 1 --timeout 60)
  VLLM=(--engine vllm --preset tiny --clients 1 2 --max-tokens 8 --timeout 60)
  LIMITS=(300 300 300 300)
else
  TRAIN=(--presets minimind2-small minimind2 --dtypes bf16 --compile --batch-size 32 --seq-len 512 --steps 5 --rounds 3)
  GENERATE=(--preset minimind2-small --precisions fp32 bf16 --batch-sizes 1 16 --compile on --new-tokens 128 --rounds 3 --no-cache-max-batch 0)
  SERVE=(--preset minimind2-small --clients 1 16 --max-tokens 128 --batch-sizes 16 --num-cpus 4 --timeout 60)
  VLLM=(--engine vllm --preset minimind2-small --clients 1 16 --max-tokens 128 --num-cpus 4 --timeout 60)
  LIMITS=(210 170 80 120)  # seconds per step: 580 in all, the rest of the 10 minutes for start-up
fi

"$PY" - <<'EOF' || { echo "bench/gpu.sh: the project is not importable with $PY (install it first: make install)"; exit 2; }
import torch, transformers, ray, minimind  # noqa: F401
print(f"torch {torch.__version__}, transformers {transformers.__version__}, ray {ray.__version__}; "
      f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA GPU'}")
EOF

failed=()
step() {  # step SCRIPT[:LABEL] LIMIT ARGS...: run bench/SCRIPT.py under its time limit, keep going if it fails
  local script=${1%%:*} name=${1##*:} limit=$2; shift 2
  echo; echo "== $name (at most ${limit}s)"
  local started=$SECONDS
  timeout --kill-after=10 "$limit" "$PY" "bench/$script.py" "$@" 2>&1 | tee "$OUT/$name.txt"
  local status=${PIPESTATUS[0]}
  echo "== $name: exit $status after $((SECONDS - started))s"
  [ "$status" -eq 0 ] || failed+=("$name (exit $status)")
}
step train "${LIMITS[0]}" "${TRAIN[@]}"
step generate "${LIMITS[1]}" "${GENERATE[@]}"
step serve "${LIMITS[2]}" "${SERVE[@]}"
step serve:serve_vllm "${LIMITS[3]}" "${VLLM[@]}"

"$PY" - "$OUT" "${failed[*]:-}" <<'EOF'
import json, subprocess, sys
from pathlib import Path

out, failed = Path(sys.argv[1]), sys.argv[2]
parts = {path.name.split("-")[0]: json.loads(path.read_text()) for path in sorted(out.glob("*.json")) if path.name != "gpu.json"}
try:
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=20).stdout.strip()
except (OSError, subprocess.SubprocessError):
    gpu = None
(out / "gpu.json").write_text(json.dumps({"nvidia_smi": gpu, "failed": failed.split() if failed else [], **parts}, indent=2) + "\n")
print(f"\nwrote {out / 'gpu.json'} ({', '.join(parts) or 'no results'})")
EOF
if [ ${#failed[@]} -gt 0 ]; then echo "bench/gpu.sh: did not finish: ${failed[*]}"; exit 1; fi
