#!/usr/bin/env bash
# The whole CLGRPO recipe on the embedded default (toy EmoSet + tiny VLM), offline:
#   toy data -> tiny VLM -> COT construction (toy teachers) -> baseline SFT on labels and
#   stage 1 SFT on COT (side by side) -> stage 2 GRPO (format) -> stage 3 GRPO (format + accuracy)
#   -> stage 4 CLGRPO (clip-low) -> the table: eval.py on the test split for the baseline and
#   stages 1-4 (greedy, and stages 1-4 sampled at temperature 1; each checkpoint evaluated in the
#   background as soon as it is ready) -> the facts each stage's reasoning gets right.
#
# usage: bash demo.sh [--device cpu|cuda|auto] [--seed N] [--out DIR] [--redo]
#                     [--difficulty wheel|stepwise|demo|hard|easy] [--clip-ablation] [--seeds "0 1 2" [--jobs N]]
#   --redo           rerun finished stages (default: skip them; an interrupted stage resumes)
#   --difficulty D   the toy setting (default wheel: the counting rule on `stepwise` images, taught by
#                    teachers that go round the quadrants and write the wheel step in numbers;
#                    stepwise: the same images, teachers that leave the wheel step out; demo: the
#                    one-glance colour rule; see docs/experiments.md)
#   --clip-ablation  also, from this run's stage 3, the same 4th stage under every clip setting:
#                    0.2/0.2 (= stage 3 continued), 0.2/0.1 (stage 4's preset), 0.1/0.2, 0.1/0.1, 0.2/0.28
#   --seeds LIST     the table over seeds: this run with --clip-ablation for each seed in LIST (into
#                    OUT/seedN, OUT defaults to runs/seeds), then mean +- std per row with each stage's
#                    zero-std share, the facts per stage and the pictures (scripts/stage_table.py);
#                    --jobs N runs N seeds at a time (numbers do not depend on it)
#   --hard           the previous hard toy's table: --difficulty hard --seeds "0 1 2" (OUT: runs/hard)
# Every knob below can also be set from the environment (e.g. STAGE3_STEPS=40 bash demo.sh).
# THREADS (default 1) fixes torch's CPU threads per process: the same seed, machine and THREADS
# give the same table (another thread count splits the floating-point sums differently, so the
# numbers differ in the last digits, and after RL's sampling by more). One thread each suits two
# cores: the baseline and stage 1 train side by side, and the RL stages beside the evaluation lane
# (two threads for the RL stages there made stage 3 1.5 times slower, docs/experiments.md).
# RL_JOBS (default 2) is how many of the 4th-stage runs (stage 4 and the clip study's runs, all from
# stage 3) run at a time, each one process on its own core.
# LORA_RANK=8 runs stages 2-4 with LoRA adapters of rank 8, SFT_LORA_RANK=8 the baseline and stage 1
#   (docs/lora.md: on the toy's random init LoRA suits stages 2-4, not SFT; RL_LR=1e-3 tracked
#   full fine-tuning in stage 3), e.g. LORA_RANK=8 RL_LR=1e-3 bash demo.sh --out runs/demo_lora
set -euo pipefail
cd "$(dirname "$0")"

DEVICE=${DEVICE:-auto}; SEED=${SEED:-0}; OUT=${OUT:-}; REDO=0; CLIP_ABLATION=0; SEEDS=; JOBS=${JOBS:-1}
DIFFICULTY=${DIFFICULTY:-wheel}
while [[ $# -gt 0 ]]; do
  case $1 in
    --device) DEVICE=$2; shift 2 ;;
    --seed) SEED=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --redo) REDO=1; shift ;;
    --difficulty) DIFFICULTY=$2; shift 2 ;;
    --clip-ablation) CLIP_ABLATION=1; shift ;;
    --seeds) SEEDS=$2; shift 2 ;;
    --hard) DIFFICULTY=hard; SEEDS="0 1 2"; OUT=${OUT:-runs/hard}; shift ;;
    --jobs) JOBS=$2; shift 2 ;;
    -h|--help) sed -n "2,/^set -euo/p" "$0" | sed "\$d"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

if [[ -n $SEEDS ]]; then
  # One seed per run (THREADS threads per process), JOBS at a time; then the table over seeds.
  OUT=${OUT:-runs/seeds}; mkdir -p "$OUT"
  pass=(); [[ $REDO == 1 ]] && pass+=(--redo)
  running=0; failed=0; pids=()
  for seed in $SEEDS; do
    clip=(--clip-ablation); [[ ${CLIP_STUDY:-1} == 0 ]] && clip=()   # CLIP_STUDY=0: the stages only
    bash "$0" --difficulty "$DIFFICULTY" "${clip[@]}" --seed "$seed" --out "$OUT/seed$seed" \
      --device "$DEVICE" "${pass[@]}" > "$OUT/seed$seed.log" 2>&1 &
    pids+=($!); running=$((running + 1)); echo "== $DIFFICULTY seed $seed (log: $OUT/seed$seed.log)"
    if (( running >= JOBS )); then wait -n || failed=1; running=$((running - 1)); fi
  done
  for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
  (( failed == 0 )) || { echo "a seed failed: see $OUT/seed*.log" >&2; exit 1; }
  seeds=(); for seed in $SEEDS; do seeds+=("$OUT/seed$seed"); done
  echo; echo "$DIFFICULTY toy, test split, mean +- std over seeds (%), also in $OUT/stage_table.md:"
  python scripts/stage_table.py "${seeds[@]}" --out "$OUT"
  echo "Pictures: $OUT/stage_bars.png, $OUT/stage_curves.png, $OUT/sft_curves.png, $OUT/stage_facts.png"
  exit 0
fi
OUT=${OUT:-runs/demo}
THREADS=${THREADS:-1}
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS

# Budget per setting (docs/experiments.md has the measurements behind each number).
DATA_DIFFICULTY=$DIFFICULTY
case $DIFFICULTY in
  wheel)    DATA_DIFFICULTY=stepwise; TEACHER_RULE=:wheel
            SFT_STEPS=${SFT_STEPS:-1200}; MODEL_SIZE=${MODEL_SIZE:-tiny}; SFT_LR=${SFT_LR:-5e-4}
            BASELINE_STEPS=${BASELINE_STEPS:-2400}   # labels only: twice the steps, and still flat
            RL_LR=${RL_LR:-2e-5}         # 1e-4 wore the stepwise student's facts down (docs/experiments.md)
            MAX_NEW=${MAX_NEW:-144} ;;   # the wheel reasoning runs to ~120 tokens
  stepwise) SFT_STEPS=${SFT_STEPS:-1200}; MODEL_SIZE=${MODEL_SIZE:-tiny}; TEACHER_RULE=:stepwise
            SFT_LR=${SFT_LR:-5e-4}        # 2e-3 held the colour reading back for ~1000 steps
            MAX_NEW=${MAX_NEW:-112} ;;    # the quadrant-by-quadrant reasoning runs to ~95 tokens
  hard)     SFT_STEPS=${SFT_STEPS:-2000}; MODEL_SIZE=${MODEL_SIZE:-tiny};  TEACHER_RULE=:hard ;;
  *)        SFT_STEPS=${SFT_STEPS:-800};  MODEL_SIZE=${MODEL_SIZE:-tiny};  TEACHER_RULE= ;;
esac
SFT_LR=${SFT_LR:-2e-3}               # sft.py's default
LORA=(); [[ -n ${LORA_RANK:-} ]] && LORA=(--lora-rank "$LORA_RANK")   # documented variants, off by default
SFT_LORA=(); [[ -n ${SFT_LORA_RANK:-} ]] && SFT_LORA=(--lora-rank "$SFT_LORA_RANK")
RL_LR=${RL_LR:-1e-4}                 # best of 5e-5, 1e-4, 2e-4 on val; the tiny model's RL was unstable above 1e-4
MAX_NEW=${MAX_NEW:-64}
RL_COMMON=("${LORA[@]}" --lr "$RL_LR" --batch-size 4 --num-generations 8 --max-new-tokens "$MAX_NEW" --beta 0.04
           --eval-every 40 --save-every 20 --sample-every 10 --device "$DEVICE" --seed "$SEED")
STAGE2_STEPS=${STAGE2_STEPS:-15}
STAGE3_STEPS=${STAGE3_STEPS:-80}
STAGE4_STEPS=${STAGE4_STEPS:-80}
SFT_EVAL_EVERY=${SFT_EVAL_EVERY:-200}   # validation accuracy during SFT (each costs ~7 s of stage 1's time)
EVAL_SAMPLES=${EVAL_SAMPLES:-4}   # completions per test image in the temperature-1 evaluation

export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1
mkdir -p "$OUT"
DATA=$OUT/data; MODEL=$OUT/tiny_vlm; COT=$OUT/cot/train.jsonl
TIMES=$OUT/times.tsv; [[ -f $TIMES ]] || printf 'stage\tseconds\n' > "$TIMES"

# run NAME CMD...: skip if NAME finished before (unless --redo), time it, mark it done. Either way
# it marks NAME ready for this invocation's evaluation lane (below).
run() {
  local name=$1; shift
  if [[ -f $OUT/.done_$name && $REDO == 0 ]]; then
    echo "== $name: done before, skipped (--redo to rerun)"; touch "$OUT/.ready_$name"; return
  fi
  echo "== $name"
  local t0=$SECONDS
  "$@"
  printf '%s\t%s\n' "$name" $((SECONDS - t0)) >> "$TIMES"
  touch "$OUT/.done_$name" "$OUT/.ready_$name"
}
resume_flag() { [[ -f $1/checkpoint/trainer_state.pt && $REDO == 0 ]] && echo --resume || true; }
rm -f "$OUT"/.ready_*

# The rows of the table, in order: NAME=folder, with the stage (run name) that makes it. Stages
# 1-4 are also evaluated sampled at temperature 1, what GRPO itself sees.
ROWS=(baseline=baseline stage1_sft=stage1 stage2_format=stage2 stage3_format_acc=stage3 stage4_clgrpo=stage4)
T1_ROWS=" stage1_sft stage2_format stage3_format_acc stage4_clgrpo "
# The clip study: the same 4th stage from this run's stage 3 under every clip setting
# (eps_low/eps_high); the stage-4 row itself is 0.2/0.1, and 0.2/0.2 is stage 3 continued for as
# many steps. ABL_MU / ABL_LR add the study's variant in which the ratio moves further (more updates
# per batch, a larger step), for the two readings of clip-low against the symmetric range:
# 0.2/0.1, 0.1/0.2 and 0.2/0.2, rows named ..._muM_lrL.
ABLATION=()   # NAME:LOW/HIGH
if [[ $CLIP_ABLATION == 1 ]]; then
  for clip in 0.2/0.2 0.1/0.2 0.1/0.1 0.2/0.28; do ABLATION+=("abl_clip_${clip%/*}_${clip#*/}:$clip"); done
  if [[ -n ${ABL_MU:-}${ABL_LR:-} ]]; then
    VARIANT=_mu${ABL_MU:-2}_lr${ABL_LR:-$RL_LR}
    for clip in 0.2/0.1 0.2/0.2 0.1/0.2; do ABLATION+=("abl_clip_${clip%/*}_${clip#*/}$VARIANT:$clip"); done
  fi
fi
for entry in "${ABLATION[@]}"; do ROWS+=("${entry%%:*}=${entry%%:*}"); done

# The evaluation lane: one background process that evaluates each row on the test split as soon
# as its stage is ready, on the second core while the next stage trains (log: OUT/eval.log). Each
# row is evaluated on its own (eval.py --append; each sampled row from the same seed), so the
# numbers do not depend on when it runs.
EVAL=(--data "$DATA" --split test --device "$DEVICE" --max-new-tokens "$MAX_NEW" --append)
wait_ready() {   # wait_ready NAME: until stage NAME is ready; fails if the main script has gone
  until [[ -f $OUT/.ready_$1 ]]; do kill -0 $$ 2>/dev/null || return 1; sleep 2; done
}
eval_lane() {
  local row name folder
  for row in "${ROWS[@]}"; do
    name=${row%%=*}; folder=${row#*=}
    wait_ready "$folder" || exit 1
    run "eval_$name" python eval.py "${EVAL[@]}" --out "$OUT/eval" --model "$OUT/$folder" --name "$name"
    if [[ $T1_ROWS == *" $name "* ]]; then
      run "eval_t1_$name" python eval.py "${EVAL[@]}" --out "$OUT/eval_t1" --model "$OUT/$folder" --name "$name" \
        --temperature 1 --samples "$EVAL_SAMPLES" --seed "$SEED"
    fi
  done
}
eval_lane > "$OUT/eval.log" 2>&1 &
lane_pid=$!
trap 'pkill -P $lane_pid 2>/dev/null || true; kill $lane_pid 2>/dev/null || true' EXIT

run data    python toy.py data "$DATA" --difficulty "$DATA_DIFFICULTY" --seed "$SEED"
run model   python toy.py model "$MODEL" --seed "$SEED" --size "$MODEL_SIZE"
build_cot() {
  mkdir -p "$OUT/cot"; rm -f "$COT" "$COT".*      # a finished stage is never re-entered; start clean
  python cot_builder.py --data "$DATA" --split train --teacher toy:describer$TEACHER_RULE \
    --teacher toy:counter$TEACHER_RULE --teacher toy:terse$TEACHER_RULE --out "$COT" > "$OUT/cot/log.txt"
  python -c "import json, sys; s = json.load(open(sys.argv[1])); print('kept', s['kept'], 'dropped', s['dropped'], 'blind accuracy', {k: v['blind_accuracy'] for k, v in s['teachers'].items()})" "$COT.summary.json"
}
run cot build_cot
SFT=("${SFT_LORA[@]}" --lr "$SFT_LR" --steps "$SFT_STEPS" --eval-every "$SFT_EVAL_EVERY" --save-every 100 --max-new-tokens "$MAX_NEW"
     --device "$DEVICE" --seed "$SEED")
# The baseline and stage 1 do not depend on each other: train them side by side (the baseline's
# progress bar goes to its log), and stage 2 starts as soon as stage 1 is done. Each is one
# deterministic process, so this changes no number.
echo "== baseline: in the background, log in $OUT/baseline.log"
run baseline python sft.py --mode label --model "$MODEL" --data "$DATA" --out "$OUT/baseline" "${SFT[@]}" \
  --steps "${BASELINE_STEPS:-$SFT_STEPS}" \
  $(resume_flag "$OUT/baseline") > "$OUT/baseline.log" 2>&1 &
baseline_pid=$!
run stage1  python sft.py --mode cot --cot "$COT" --model "$MODEL" --data "$DATA" --out "$OUT/stage1" "${SFT[@]}" $(resume_flag "$OUT/stage1")
run stage2  python clgrpo.py --stage 2 --model "$OUT/stage1" --data "$DATA" --out "$OUT/stage2" --steps "$STAGE2_STEPS" "${RL_COMMON[@]}" $(resume_flag "$OUT/stage2")
run stage3  python clgrpo.py --stage 3 --model "$OUT/stage2" --data "$DATA" --out "$OUT/stage3" --steps "$STAGE3_STEPS" "${RL_COMMON[@]}" $(resume_flag "$OUT/stage3")
# The 4th-stage runs (stage 4, and with --clip-ablation the clip study) all start from stage 3 and
# do not depend on each other: RL_JOBS of them (default 2, one per core) run at a time, the clip
# study's output going to OUT/NAME.log. Each is one deterministic process, so this changes no number.
RL_JOBS=${RL_JOBS:-2}; fourth=()
fourth_stage() {   # fourth_stage NAME ARGS...: `run NAME ARGS...` in the background, RL_JOBS at a time
  local finished keep=() pid
  if (( ${#fourth[@]} >= RL_JOBS )); then
    wait -n -p finished "${fourth[@]}" || { echo "a 4th-stage run failed: see $OUT/*.log" >&2; exit 1; }
    for pid in "${fourth[@]}"; do [[ $pid == "$finished" ]] || keep+=("$pid"); done
    fourth=("${keep[@]}")
  fi
  run "$@" &
  fourth+=($!)
}
fourth_stage stage4  python clgrpo.py --stage 4 --model "$OUT/stage3" --data "$DATA" --out "$OUT/stage4" --steps "$STAGE4_STEPS" "${RL_COMMON[@]}" $(resume_flag "$OUT/stage4")
for entry in "${ABLATION[@]}"; do
  name=${entry%%:*}; clip=${entry#*:}; extra=()
  [[ $name == *_mu* ]] && extra=(--mu "${ABL_MU:-2}" --lr "${ABL_LR:-$RL_LR}")   # after RL_COMMON, so they win
  fourth_stage "$name" python clgrpo.py --stage 4 --model "$OUT/stage3" --data "$DATA" --out "$OUT/$name" \
    --steps "$STAGE4_STEPS" --eps-low "${clip%/*}" --eps-high "${clip#*/}" "${RL_COMMON[@]}" "${extra[@]}" \
    $(resume_flag "$OUT/$name") > "$OUT/$name.log" 2>&1
done
for pid in "${fourth[@]}"; do wait "$pid" || { echo "a 4th-stage run failed: see $OUT/*.log" >&2; exit 1; }; done
wait "$baseline_pid" || { echo "the baseline failed: see $OUT/baseline.log" >&2; exit 1; }
echo "== waiting for the evaluation lane (log: $OUT/eval.log)"
wait "$lane_pid" || { echo "an evaluation failed: see $OUT/eval.log" >&2; exit 1; }

echo; echo "Results (test split, %; greedy, then sampled at temperature 1), also in $OUT/stage_table.md:"
python scripts/stage_table.py "$OUT" --out "$OUT"
echo; echo "Seconds per stage:"; column -t "$TIMES" 2>/dev/null || cat "$TIMES"
