#!/usr/bin/env bash
# Everything a lent GPU must measure, in one command (about 13 minutes on one H100 / H200):
#   1. the benchmark tables of `make bench` at Qwen2-VL-2B's widths in bf16
#      (`--full` where a script has it: layers, model, serve, train; lora is at those widths already,
#      here at full depth; layers adds its torch.compile'd rows; scaling and chain have no --full);
#   2. the real-shape checks (bench/real_shape.py) at full depth: convert, generate, save/load,
#      a router step, an SFT step, the activation estimate against autograd's saved bytes;
#   3. a 30-step router stage and a 30-step SFT stage on the 2B shape (random weights, the
#      procedural driving world), their peak memory beside what `mose estimate` predicts;
#   4. the shipped CODA-LM LoRA recipe's stage sequence (router → sft → refit) on the 2B shape
#      in bf16, shrunk by overrides, then predict: chains and answers compared across batch
#      shapes and precisions, with tolerances (bench/recipe_run.py);
#   5. where vLLM is installed beside mose: answer tokens/s of `mose predict` with the torch and the
#      vLLM engine on the same questions, at the 2B widths (bench/engines.py);
#   6. `mose estimate` of the shipped CODA-LM recipe on 1 and 8 GPUs.
# Each part has its own time limit, so one slow part cannot eat the others' time.
#
#   bash bench/gpu.sh                          # on a GPU
#   bash bench/gpu.sh --device cpu --quick     # the same path on the CPU at tiny widths (tests run it)
#   OUT_DIR=runs/gpu bash bench/gpu.sh         # also keep the logs and the real-shape JSON there
#   BENCHES="layers train" bash bench/gpu.sh   # only these of part 1 (default: all seven)
set -euo pipefail

DEVICE=cuda
QUICK=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=${2:?--device needs cpu or cuda}; shift 2 ;;
    --quick) QUICK=1; shift ;;
    -h|--help) sed -n 2,20p "$0"; exit 0 ;;
    *) echo "gpu.sh: unknown argument $1 (expected --device DEV, --quick)" >&2; exit 2 ;;
  esac
done
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=$(command -v python3)
OUT_DIR=${OUT_DIR:-$(mktemp -d)}
mkdir -p "$OUT_DIR"
FAILED=()

# part NAME LIMIT_S COMMAND...: run in bench/, tee its output to OUT_DIR/NAME.log, note a failure.
part() {
  local name=$1 limit=$2; shift 2
  echo; echo "## $name"; local begin=$SECONDS
  if ! (cd "$ROOT/bench" && timeout "$limit" "$@") 2>&1 | tee "$OUT_DIR/$name.log"; then
    FAILED+=("$name")
  fi
  echo "($name: $((SECONDS - begin)) s, limit $limit s)"
}

if [ "$QUICK" = 1 ]; then
  # the CPU's quick runs take up to 40 s a script (train.py): twice the GPU's limits
  WIDTH=(--quick); FULL=(); SHAPE=(--quick --stages 3); STAGE_LIMIT=120; LIMIT_SCALE=2
  RECIPE=(--quick); RECIPE_LIMIT=120
else
  WIDTH=(); FULL=(--full); SHAPE=(--layers 28 --stages 30 --batch 8); STAGE_LIMIT=170; LIMIT_SCALE=1
  RECIPE=(--layers 8 --steps 30); RECIPE_LIMIT=300
fi
echo "# bench/gpu.sh — device $DEVICE$([ "$QUICK" = 1 ] && echo ', quick'); logs in $OUT_DIR"
"$PY" -c "import torch; print('torch', torch.__version__, '|',
    torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"

# script → its time limit (s) on a GPU, and whether it has --full (the 2B widths)
declare -A LIMIT=([layers]=150 [model]=60 [scaling]=30 [chain]=30 [serve]=100 [train]=75 [lora]=60)
declare -A HAS_FULL=([layers]=1 [model]=1 [serve]=1 [train]=1)
for bench in ${BENCHES:-layers model scaling chain serve train lora}; do
  [ -n "${LIMIT[$bench]:-}" ] || { echo "gpu.sh: unknown benchmark $bench in BENCHES" >&2; exit 2; }
  flags=("${WIDTH[@]}")
  [ -n "${HAS_FULL[$bench]:-}" ] && flags+=("${FULL[@]}")
  [ "$bench" = lora ] && [ "$QUICK" = 0 ] && flags+=(--layers 28 --batch 8)
  [ "$bench" = layers ] && [ "$QUICK" = 0 ] && flags+=(--compile)  # + compiled rows (inductor)
  part "$bench" "$(( LIMIT[$bench] * LIMIT_SCALE ))" "$PY" "$bench.py" --device "$DEVICE" "${flags[@]}"
done
# The real-shape checks, then the training stages with the estimator's prediction beside them.
part real_shape "$STAGE_LIMIT" "$PY" real_shape.py --device "$DEVICE" "${SHAPE[@]}" \
  --json "$OUT_DIR/real_shape.json"
echo; echo "## training stages (measured peak beside mose estimate's prediction)"
"$PY" - "$OUT_DIR/real_shape.json" <<'PYEOF' || FAILED+=("training stages")
import json, sys
rows = [r for r in json.load(open(sys.argv[1])) if r["check"].endswith("_stage")]
print("| stage | steps | batch × seq | s | peak MiB | estimate MiB | estimate ÷ peak |\n|---|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['check']} | {r['steps']} | {r['batch']} × {r['seq']} | {r['seconds']:.1f} | "
          f"{r['peak_mib']:.0f} | {r['predicted_mib']:.0f} | {r['predicted_mib'] / r['peak_mib']:.3f} |")
if not rows:
    sys.exit("no stage rows: real_shape.py did not reach its stages")
PYEOF
part recipe_run "$RECIPE_LIMIT" "$PY" recipe_run.py --device "$DEVICE" "${RECIPE[@]}" \
  --json "$OUT_DIR/recipe_run.json"
# Both engines' answer tokens/s, where vLLM is installed beside mose (PY=.venv-engine/bin/python on the CPU).
if "$PY" -c "import vllm" 2>/dev/null; then
  if [ "$QUICK" = 1 ]; then ENGINES=(--quick); else ENGINES=(--full --questions 256 --max-new-tokens 64); fi
  part engines "$(( 300 * LIMIT_SCALE ))" "$PY" engines.py --device "$DEVICE" "${ENGINES[@]}"
else
  echo; echo "## engines: skipped, vLLM is not installed beside mose for $PY (pip install vllm)"
fi
echo; echo "## mose estimate (configs/coda-lm/mose.yaml)"
(cd "$ROOT" && "$PY" - <<'PYEOF') || FAILED+=("estimate")
from rich.console import Console
from mose.estimate import estimate_table
for gpus in (1, 8):
    Console(width=200).print(estimate_table("configs/coda-lm/mose.yaml", gpus))
PYEOF

if [ ${#FAILED[@]} -gt 0 ]; then
  echo "gpu.sh: failed or timed out: ${FAILED[*]} (logs in $OUT_DIR)" >&2
  exit 1
fi
echo "gpu.sh: all parts done in $SECONDS s"
