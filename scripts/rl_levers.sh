#!/usr/bin/env bash
# The RL levers the method itself has, tried on one seed of a finished `wheel` demo run: stage 3
# again from that seed's stage-2 checkpoint, one change at a time from the run's stage-3 setting,
# then the test split (greedy, and sampled at temperature 1 with 4 samples per image), as the
# demo's own rows. The set was fixed before looking at the results it is judged by.
#
# usage: bash scripts/rl_levers.sh RUN [LEVER ...]    (RUN: a demo.sh --seeds seed folder, e.g. runs/wheel/seed0)
#   levers: g16 (G = 16 instead of 8), steps160 (160 steps instead of 80), temp0.7 (sample and score
#   at temperature 0.7 instead of 1), beta0.2 (KL weight 0.2 instead of 0.04); default: all four.
#   Runs JOBS (default 2) at a time, one thread each; writes RUN/levers/NAME and the table
#   RUN/levers/levers.md (scripts/stage_table.py) next to the run's own stage 2 and 3 rows.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:?usage: bash scripts/rl_levers.sh RUN [LEVER ...]}; shift
LEVERS=("$@"); [[ ${#LEVERS[@]} -gt 0 ]] || LEVERS=(g16 steps160 temp0.7 beta0.2)
JOBS=${JOBS:-2}; SEED=${SEED:-$(basename "$RUN" | tr -dc 0-9)}; SEED=${SEED:-0}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1
# the wheel setting's stage 3 (demo.sh): everything a lever does not change
BASE=(--stage 3 --model "$RUN/stage2" --data "$RUN/data" --lr 2e-5 --batch-size 4 --num-generations 8
      --max-new-tokens 144 --beta 0.04 --steps 80 --eval-every 40 --save-every 20 --sample-every 10 --seed "$SEED")
lever_flags() {
  case $1 in
    g16) echo --num-generations 16 ;;
    steps160) echo --steps 160 ;;
    temp0.7) echo --temperature 0.7 ;;
    beta0.2) echo --beta 0.2 ;;
    *) echo "unknown lever $1" >&2; exit 2 ;;
  esac
}
train_lever() {
  local out=$RUN/levers/$1
  [[ -f $out/.done ]] && return 0
  # shellcheck disable=SC2046
  python clgrpo.py "${BASE[@]}" $(lever_flags "$1") --out "$out" > "$out.log" 2>&1 && touch "$out/.done"
}
evaluate() {   # evaluate FOLDER EVAL.PY-FLAGS...: each lever's row, one after another (one results.json)
  local folder=$1 lever; shift
  for lever in "${LEVERS[@]}"; do
    [[ -f $RUN/levers/$folder/.done_$lever ]] && continue
    python eval.py --data "$RUN/data" --split test --max-new-tokens 144 --append --model "$RUN/levers/$lever" \
      --name "stage3_$lever" --out "$RUN/levers/$folder" "$@" >> "$RUN/levers/$folder.log" 2>&1
    touch "$RUN/levers/$folder/.done_$lever"
  done
}
mkdir -p "$RUN/levers"; ln -sfn ../data "$RUN/levers/data"   # the ceiling (data/toy_info.json) for the table
pids=()
for lever in "${LEVERS[@]}"; do
  lever_flags "$lever" > /dev/null
  echo "== lever $lever (log: $RUN/levers/$lever.log)"
  train_lever "$lever" &
  pids+=($!)
  if (( ${#pids[@]} >= JOBS )); then
    wait -n -p finished "${pids[@]}" || true
    keep=(); for pid in "${pids[@]}"; do [[ $pid == "$finished" ]] || keep+=("$pid"); done; pids=("${keep[@]}")
  fi
done
for pid in "${pids[@]}"; do wait "$pid" || true; done
for lever in "${LEVERS[@]}"; do
  [[ -f $RUN/levers/$lever/.done ]] || { echo "lever $lever failed: see $RUN/levers/$lever.log" >&2; exit 1; }
done
echo "== test split: greedy and sampled at temperature 1 (logs: $RUN/levers/eval*.log)"
mkdir -p "$RUN/levers/eval" "$RUN/levers/eval_t1"
evaluate eval & greedy=$!
evaluate eval_t1 --temperature 1 --samples 4 --seed "$SEED"
wait "$greedy"
python scripts/stage_table.py "$RUN/levers" --out "$RUN/levers" > /dev/null
echo "levers (test split, %), also in $RUN/levers/stage_table.md:"; cat "$RUN/levers/stage_table.md"
