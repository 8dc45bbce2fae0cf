#!/usr/bin/env bash
# Everything issue 5 measures on a GPU machine, in one run: the checks, then the numbers.
#
#   source .gpu/use-flashinfer.sh .gpu; OUT=/tmp/out bash bench/gpu_all.sh
#
# Stages (each runs even when one before it failed; the exit status is the first failure):
#   1. device, versions, FlashInfer import
#   2. Triton fused-MoE check (bench/bench_fused_moe.py), in the background on the last GPU
#   3. GPU tests (pytest -m gpu tests/gpu): FlashInfer vs torch attention, the Triton MoE
#      kernel vs torch, CUDA graphs vs eager,
#      NCCL tp 2 vs tp 1
#   4. figure (b), roofline fraction at batch 1 (GPU 0): figure (b)'s 8-layer stack, then
#      Llama-3.1-8B's shape (bench/models/llama-3.1-8b, dummy weights)
#   5. host time per decode step, overlap on and off (bench/bench_host_time.py) for the
#      realistic shapes in HOST_DIRS at TPS
#   6. figure (a), decode TPOT auto vs --attn-tp-gather on, per model and TP size (MODELS:
#      benchmark shapes; TPOT_DIRS: realistic shapes)
# Writes under $OUT: fused_moe.json, roofline*.json, host_time.json, tpot.json, tests.txt,
# results.md (the tables, with the card and the commands) and logs/ (each stage's output,
# as it runs). STAGES picks stages (default: all of "device moe tests roofline host
# tpot"); TESTS narrows the GPU tests (pytest node ids); MODELS, TPS, BATCH_SIZES,
# NEW_TOKENS, REPEATS and LAUNCHES narrow figure (a); a
# model whose module is missing is skipped. On a machine lent for at most 10 minutes a
# command, split it, e.g. STAGES="device tpot" MODELS="..." TPS="2 4".
set -uo pipefail
OUT=${OUT:-/tmp/parcap-gpu}
MODELS=${MODELS:-LlamaForCausalLM Qwen3MoeForCausalLM DeepseekV3ForCausalLM}
TPS=${TPS:-1 2 4}
BATCH_SIZES=${BATCH_SIZES:-1 2 4 8 16 32 64}
NEW_TOKENS=${NEW_TOKENS:-32}
REPEATS=${REPEATS:-3}
LAUNCHES=${LAUNCHES:-1}
STAGES=${STAGES:-device moe tests roofline host tpot}
HOST_DIRS=${HOST_DIRS:-bench/models/llama-3.1-8b bench/models/qwen3-30b-a3b bench/models/moonlight-16b-a3b}
TPOT_DIRS=${TPOT_DIRS:-}
ROOFLINE_DIRS=${ROOFLINE_DIRS:-bench/models/llama-3.1-8b}
TESTS=${TESTS:-tests/gpu}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# NVLink multicast can take a shared host's GPUs down: keep it off in every process.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
status=0
logs="$OUT/logs"  # streamed there, so that a stage killed by a time limit keeps its output
mkdir -p "$logs"

want() { [[ " $STAGES " == *" $1 "* ]]; }

stage() {  # stage NAME[:PART] LIMIT_S COMMAND...: run it, print its log, remember a failure
  local name=$1 limit=$2
  shift 2
  want "${name%%:*}" || return 0
  name=${name//:/-}
  local start=$SECONDS
  echo "=== $name: $*"
  timeout "$limit" "$@" 2>&1 | tee "$logs/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - start))s"
  [ "$status" -ne 0 ] || status=$rc
  return $rc
}

gpus=$(nvidia-smi -L | wc -l)
stage device 60 bash -c 'nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
python3 -c "import torch, triton, flashinfer; print(\"torch\", torch.__version__, \"triton\", triton.__version__, \"flashinfer\", flashinfer.__version__, \"gpus\", torch.cuda.device_count())"'

# the MoE kernel check shares nothing with stages 3-4 but its GPU; figure (a) waits for it
echo 0 >"$logs/fused_moe.rc"
if want moe; then
  (CUDA_VISIBLE_DEVICES=$((gpus - 1)) timeout 300 python3 bench/bench_fused_moe.py \
    --out "$OUT/fused_moe.json" >"$logs/fused_moe.log" 2>&1; echo $? >"$logs/fused_moe.rc") &
fi

# shellcheck disable=SC2086  # a word list on purpose
stage tests 720 python3 -m pytest -q -rA -m gpu --durations=15 $TESTS
[ ! -f "$logs/tests.log" ] || cp "$logs/tests.log" "$OUT/tests.txt"

stage roofline 300 env CUDA_VISIBLE_DEVICES=0 python3 bench/bench_roofline.py \
  --out "$OUT/roofline.json" --markdown "$logs/roofline.md"
for dir in $ROOFLINE_DIRS; do
  name=$(basename "$dir")
  stage "roofline:$name" 300 env CUDA_VISIBLE_DEVICES=0 python3 bench/bench_roofline.py \
    --model-dir "$dir" --out "$OUT/roofline-$name.json" --markdown "$logs/roofline-$name.md"
done

wait
if want moe; then
  echo "=== fused_moe: python3 bench/bench_fused_moe.py"
  cat "$logs/fused_moe.log"
  rc=$(cat "$logs/fused_moe.rc")
  echo "=== fused_moe: exit $rc"
  [ "$status" -ne 0 ] || status=$rc
fi

host_args=()
for dir in $HOST_DIRS; do host_args+=(--model-dir "$dir"); done
# shellcheck disable=SC2086  # word lists on purpose
stage host 900 python3 bench/bench_host_time.py "${host_args[@]}" --tp $TPS \
  --batch-sizes $BATCH_SIZES --new-tokens "$NEW_TOKENS" \
  --out "$OUT/host_time.json" --markdown "$logs/host.md"

tpot_args=()
for dir in $TPOT_DIRS; do tpot_args+=(--model-dir "$dir"); done
# shellcheck disable=SC2086  # word lists on purpose
stage tpot 900 python3 bench/bench_tpot.py --models $MODELS "${tpot_args[@]}" --tp $TPS \
  --batch-sizes $BATCH_SIZES --new-tokens "$NEW_TOKENS" --repeats "$REPEATS" --launches "$LAUNCHES" \
  --out "$OUT/tpot.json" --markdown "$logs/tpot.md"

{
  echo "# GPU results ($(date -u +%Y-%m-%dT%H:%MZ))"
  echo
  echo "Card: $(nvidia-smi --query-gpu=name --format=csv,noheader | sort | uniq -c | xargs)."
  echo "Command: \`source .gpu/use-flashinfer.sh .gpu; OUT=... bash bench/gpu_all.sh\`"
  echo "(STAGES='$STAGES' MODELS='$MODELS' TPS='$TPS' BATCH_SIZES='$BATCH_SIZES'"
  echo "NEW_TOKENS=$NEW_TOKENS REPEATS=$REPEATS LAUNCHES=$LAUNCHES)."
  echo
  echo "## Roofline at batch 1"
  echo
  cat "$logs"/roofline*.md 2>/dev/null || echo "(not measured: see the log)"
  echo
  echo "## Host time per decode step"
  echo
  cat "$logs/host.md" 2>/dev/null || echo "(not measured: see the log)"
  echo
  echo "## Decode TPOT, auto vs --attn-tp-gather on"
  echo
  cat "$logs/tpot.md" 2>/dev/null || echo "(not measured: see the log)"
  echo
  echo "## Tests"
  echo
  tail -n 3 "$OUT/tests.txt" 2>/dev/null || echo "(not run)"
} >"$OUT/results.md"
echo "=== results.md"
cat "$OUT/results.md"
exit "$status"
