#!/usr/bin/env bash
# Does a change leave behaviour alone? Runs the same short training runs with the code of two
# checkouts and compares them bit for bit (scripts/same_twice.py --compare: metrics.jsonl without
# its clock fields, and the saved weights).
#
# usage: bash scripts/refactor_check.sh OLD_CHECKOUT [NEW_CHECKOUT (default: this one)] [WORK (default: /tmp/refactor_check)]
#   e.g.  git worktree add /tmp/before HEAD~3 && bash scripts/refactor_check.sh /tmp/before
# The runs (one thread each, a few seconds apiece): toy data and a tiny model made once by the old
# code; a 20-step label SFT; from a 150-step label SFT (whose groups have reward signal) 3-step
# GRPO runs: stage 3, stage 3 with dynamic sampling and micro-batches, stage 4 with LoRA and
# mu 3, and stage 3 with beta 0, mu 1 and token aggregation.
set -euo pipefail
OLD=$(cd "${1:?usage: bash scripts/refactor_check.sh OLD_CHECKOUT [NEW_CHECKOUT] [WORK]}" && pwd)
NEW=$(cd "${2:-$(dirname "$0")/..}" && pwd)
WORK=${3:-/tmp/refactor_check}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
rm -rf "$WORK"; mkdir -p "$WORK"
D=$WORK/data; M=$WORK/model; B=$WORK/base150
(cd "$OLD" && python toy.py data "$D" --difficulty stepwise --seed 0 > /dev/null \
  && python toy.py model "$M" --seed 0 --size tiny > /dev/null \
  && python sft.py --mode label --model "$M" --data "$D" --out "$B" --steps 150 --lr 2e-3 --eval-every 0 \
       --save-every 150 --max-new-tokens 64 --device cpu --seed 0 > "$WORK/base150.log" 2>&1)
RL=(--data "$D" --steps 3 --batch-size 4 --num-generations 8 --max-new-tokens 64 --mu 2 --beta 0.04 --lr 1e-4
    --eval-every 3 --eval-limit 8 --save-every 2 --sample-every 1 --device cpu --seed 0)
runs() {   # runs CHECKOUT OUT: the short runs with that checkout's code
  local code=$1 out=$2
  mkdir -p "$out"
  cd "$code"
  python sft.py --mode label --model "$M" --data "$D" --out "$out/sft" --steps 20 --lr 2e-3 --eval-every 10 \
    --eval-limit 16 --save-every 10 --max-new-tokens 64 --device cpu --seed 0 > "$out/sft.log" 2>&1
  python clgrpo.py --stage 3 --model "$B" --out "$out/s3" "${RL[@]}" > "$out/s3.log" 2>&1
  python clgrpo.py --stage 3 --model "$B" --out "$out/s3dyn" "${RL[@]}" --dynamic-sampling --micro-batch 12 \
    > "$out/s3dyn.log" 2>&1
  python clgrpo.py --stage 4 --model "$B" --out "$out/s4lora" "${RL[@]}" --lora-rank 4 --mu 3 --micro-batch 16 \
    > "$out/s4lora.log" 2>&1
  python clgrpo.py --stage 3 --model "$B" --out "$out/s3b0" "${RL[@]}" --beta 0 --mu 1 --scale-rewards none \
    --aggregation token > "$out/s3b0.log" 2>&1
}
(runs "$OLD" "$WORK/old")
(runs "$NEW" "$WORK/new")
pairs=(); for r in sft s3 s3dyn s4lora s3b0; do pairs+=("$WORK/old/$r" "$WORK/new/$r"); done
cd "$NEW" && python scripts/same_twice.py --compare "${pairs[@]}"
