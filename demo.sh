#!/usr/bin/env bash
# The whole CLGRPO recipe on the embedded default (toy EmoSet + tiny VLM), offline:
#   toy data -> tiny VLM -> COT construction (toy teachers) -> baseline SFT on labels ->
#   stage 1 SFT on COT -> stage 2 GRPO (format) -> stage 3 GRPO (format + accuracy) ->
#   stage 4 CLGRPO (clip-low) -> eval.py over baseline and stages 1-4.
#
# usage: bash demo.sh [--device cpu|cuda|auto] [--seed N] [--out DIR] [--redo] [--ablation]
#                     [--difficulty demo|hard] [--clip-ablation] [--hard [--jobs N]]
#   --redo           rerun finished stages (default: skip them; an interrupted stage resumes)
#   --ablation       afterwards, stage 4 under 4 clip settings + stage 3 continued, over 3 seeds
#   --difficulty D   the toy setting (default demo; hard = the counting rule, see toy.py)
#   --clip-ablation  in this run, also stage 4 from this run's stage 3 under narrow (0.1/0.1)
#                    and clip-higher (0.2/0.28) bounds, and stage 3 continued; rows in the table
#   --hard           the hard table: --difficulty hard --clip-ablation for seeds 0 1 2 (into
#                    OUT/seedN, OUT defaults to runs/hard), then mean +- std per row with each
#                    stage's zero-std share and the pictures (scripts/stage_table.py);
#                    --jobs N runs N seeds at a time (numbers do not depend on it)
# Every knob below can also be set from the environment (e.g. STAGE3_STEPS=40 bash demo.sh).
# LORA_RANK=8 runs stages 2-4 with LoRA adapters of rank 8, SFT_LORA_RANK=8 the baseline and stage 1
#   (docs/lora.md: on the toy's random init LoRA suits stages 2-4, not SFT; RL_LR=1e-3 tracked
#   full fine-tuning in stage 3), e.g. LORA_RANK=8 RL_LR=1e-3 bash demo.sh --out runs/demo_lora
# THREADS (default 1) fixes torch's CPU threads: the same seed, machine and THREADS give the same
# table. On a busy machine one thread is also far faster than two (README).
set -euo pipefail
cd "$(dirname "$0")"

DEVICE=${DEVICE:-auto}; SEED=${SEED:-0}; OUT=${OUT:-}; REDO=0; ABLATION=0; CLIP_ABLATION=0; HARD=0; JOBS=${JOBS:-1}
DIFFICULTY=${DIFFICULTY:-demo}
while [[ $# -gt 0 ]]; do
  case $1 in
    --device) DEVICE=$2; shift 2 ;;
    --seed) SEED=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --redo) REDO=1; shift ;;
    --ablation) ABLATION=1; shift ;;
    --difficulty) DIFFICULTY=$2; shift 2 ;;
    --clip-ablation) CLIP_ABLATION=1; shift ;;
    --hard) HARD=1; shift ;;
    --jobs) JOBS=$2; shift 2 ;;
    -h|--help) sed -n 2,23p "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

if [[ $HARD == 1 ]]; then
  # One seed per process (THREADS threads each), JOBS at a time; then the table over seeds.
  OUT=${OUT:-runs/hard}; mkdir -p "$OUT"
  pass=(); [[ $REDO == 1 ]] && pass+=(--redo)
  running=0; failed=0; pids=()
  for seed in ${HARD_SEEDS:-0 1 2}; do
    bash "$0" --difficulty hard --clip-ablation --seed "$seed" --out "$OUT/seed$seed" \
      --device "$DEVICE" "${pass[@]}" > "$OUT/seed$seed.log" 2>&1 &
    pids+=($!); running=$((running + 1)); echo "== hard seed $seed (log: $OUT/seed$seed.log)"
    if (( running >= JOBS )); then wait -n || failed=1; running=$((running - 1)); fi
  done
  for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
  (( failed == 0 )) || { echo "a seed failed: see $OUT/seed*.log" >&2; exit 1; }
  seeds=(); for seed in ${HARD_SEEDS:-0 1 2}; do seeds+=("$OUT/seed$seed"); done
  echo; echo "Hard toy, test split, mean +- std over seeds (%), also in $OUT/stage_table.md:"
  python scripts/stage_table.py "${seeds[@]}" --out "$OUT"
  echo "Pictures: $OUT/stage_bars.png, $OUT/stage_curves.png"
  exit 0
fi
OUT=${OUT:-runs/demo}
THREADS=${THREADS:-1}
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS

# Budget (measured on 2 CPU cores; see README "The demo, measured").
if [[ $DIFFICULTY == hard ]]; then
  SFT_STEPS=${SFT_STEPS:-2000}       # the label baseline's val accuracy is flat long before (README)
  TEACHER_RULE=:hard
else
  SFT_STEPS=${SFT_STEPS:-800}        # baseline and stage 1 alike; 400 was not converged on every seed
  TEACHER_RULE=
fi
SFT_LR=${SFT_LR:-2e-3}               # sft.py's default
LORA=(); [[ -n ${LORA_RANK:-} ]] && LORA=(--lora-rank "$LORA_RANK")   # documented variants, off by default
SFT_LORA=(); [[ -n ${SFT_LORA_RANK:-} ]] && SFT_LORA=(--lora-rank "$SFT_LORA_RANK")
RL_LR=${RL_LR:-1e-4}                 # best of 5e-5, 1e-4, 2e-4 on val; the tiny model's RL was unstable above 1e-4
RL_COMMON=("${LORA[@]}" --lr "$RL_LR" --batch-size 4 --num-generations 8 --max-new-tokens 64 --beta 0.04
           --eval-every 40 --save-every 20 --sample-every 10 --device "$DEVICE" --seed "$SEED")
STAGE2_STEPS=${STAGE2_STEPS:-15}
STAGE3_STEPS=${STAGE3_STEPS:-80}
STAGE4_STEPS=${STAGE4_STEPS:-80}

export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1
mkdir -p "$OUT"
DATA=$OUT/data; MODEL=$OUT/tiny_vlm; COT=$OUT/cot/train.jsonl
TIMES=$OUT/times.tsv; [[ -f $TIMES ]] || printf 'stage\tseconds\n' > "$TIMES"

# run NAME CMD...: skip if NAME finished before (unless --redo), time it, mark it done.
run() {
  local name=$1; shift
  if [[ -f $OUT/.done_$name && $REDO == 0 ]]; then echo "== $name: done before, skipped (--redo to rerun)"; return; fi
  echo "== $name"
  local t0=$SECONDS
  "$@"
  printf '%s\t%s\n' "$name" $((SECONDS - t0)) >> "$TIMES"
  touch "$OUT/.done_$name"
}
resume_flag() { [[ -f $1/checkpoint/trainer_state.pt && $REDO == 0 ]] && echo --resume || true; }

run data    python toy.py data "$DATA" --difficulty "$DIFFICULTY" --seed "$SEED"
run model   python toy.py model "$MODEL" --seed "$SEED"
build_cot() {
  mkdir -p "$OUT/cot"; rm -f "$COT" "$COT".*      # a finished stage is never re-entered; start clean
  python cot_builder.py --data "$DATA" --split train --teacher toy:describer$TEACHER_RULE \
    --teacher toy:counter$TEACHER_RULE --teacher toy:terse$TEACHER_RULE --out "$COT" > "$OUT/cot/log.txt"
  python -c "import json, sys; s = json.load(open(sys.argv[1])); print('kept', s['kept'], 'dropped', s['dropped'], 'blind accuracy', {k: v['blind_accuracy'] for k, v in s['teachers'].items()})" "$COT.summary.json"
}
run cot build_cot
SFT=("${SFT_LORA[@]}" --lr "$SFT_LR" --steps "$SFT_STEPS" --eval-every 100 --save-every 100 --device "$DEVICE" --seed "$SEED")
run baseline python sft.py --mode label --model "$MODEL" --data "$DATA" --out "$OUT/baseline" "${SFT[@]}" $(resume_flag "$OUT/baseline")
run stage1  python sft.py --mode cot --cot "$COT" --model "$MODEL" --data "$DATA" --out "$OUT/stage1" "${SFT[@]}" $(resume_flag "$OUT/stage1")
run stage2  python clgrpo.py --stage 2 --model "$OUT/stage1" --data "$DATA" --out "$OUT/stage2" --steps "$STAGE2_STEPS" "${RL_COMMON[@]}" $(resume_flag "$OUT/stage2")
run stage3  python clgrpo.py --stage 3 --model "$OUT/stage2" --data "$DATA" --out "$OUT/stage3" --steps "$STAGE3_STEPS" "${RL_COMMON[@]}" $(resume_flag "$OUT/stage3")
run stage4  python clgrpo.py --stage 4 --model "$OUT/stage3" --data "$DATA" --out "$OUT/stage4" --steps "$STAGE4_STEPS" "${RL_COMMON[@]}" $(resume_flag "$OUT/stage4")
ROWS=(--model "$OUT/baseline" --name baseline --model "$OUT/stage1" --name stage1_sft
      --model "$OUT/stage2" --name stage2_format --model "$OUT/stage3" --name stage3_format_acc
      --model "$OUT/stage4" --name stage4_clgrpo)
if [[ $CLIP_ABLATION == 1 ]]; then
  # The same 4th stage from this run's stage 3 under other clip bounds; "stage 3 continued" is
  # the symmetric 0.2/0.2 setting (the stage-4 preset differs from stage 3 only in the bounds).
  run abl_stage3_continued python clgrpo.py --stage 3 --model "$OUT/stage3" --data "$DATA" --out "$OUT/abl_stage3_continued" \
    --steps "$STAGE4_STEPS" "${RL_COMMON[@]}" $(resume_flag "$OUT/abl_stage3_continued")
  run abl_narrow python clgrpo.py --stage 4 --model "$OUT/stage3" --data "$DATA" --out "$OUT/abl_narrow" \
    --steps "$STAGE4_STEPS" --eps-low 0.1 --eps-high 0.1 "${RL_COMMON[@]}" $(resume_flag "$OUT/abl_narrow")
  run abl_cliphigher python clgrpo.py --stage 4 --model "$OUT/stage3" --data "$DATA" --out "$OUT/abl_cliphigher" \
    --steps "$STAGE4_STEPS" --eps-low 0.2 --eps-high 0.28 "${RL_COMMON[@]}" $(resume_flag "$OUT/abl_cliphigher")
  ROWS+=(--model "$OUT/abl_stage3_continued" --name "abl_sym_0.2_0.2" --model "$OUT/abl_narrow" --name "abl_narrow_0.1_0.1"
         --model "$OUT/abl_cliphigher" --name "abl_cliphigher_0.2_0.28")
fi
run eval    python eval.py --data "$DATA" --split test --out "$OUT/eval" --device "$DEVICE" "${ROWS[@]}"

echo; echo "Results (test split, %), also in $OUT/eval/results.md:"; cat "$OUT/eval/results.md"
echo; echo "Seconds per stage:"; column -t "$TIMES" 2>/dev/null || cat "$TIMES"

if [[ $ABLATION == 1 ]]; then
  # Clip ablation: stage 4 from the same stage-3 checkpoint under each clip setting, and the fair
  # control (stage 3 continued for as many steps), over 3 seeds; then mean +- std per setting.
  declare -A CLIPS=([sym_0.2]="0.2 0.2" [cliplow_0.2_0.1]="0.2 0.1" [narrow_0.1_0.1]="0.1 0.1" [cliphigher_0.2_0.28]="0.2 0.28")
  results=()
  for seed in ${ABLATION_SEEDS:-0 1 2}; do
    dir=$OUT/ablation/seed$seed; models=()
    for name in "${!CLIPS[@]}"; do
      read -r lo hi <<< "${CLIPS[$name]}"
      run "abl_${seed}_$name" python clgrpo.py --stage 4 --model "$OUT/stage3" --data "$DATA" --out "$dir/$name" \
        --steps "$STAGE4_STEPS" --eps-low "$lo" --eps-high "$hi" "${RL_COMMON[@]}" --seed "$seed" $(resume_flag "$dir/$name")
      models+=(--model "$dir/$name" --name "$name")
    done
    run "abl_${seed}_stage3_continued" python clgrpo.py --stage 3 --model "$OUT/stage3" --data "$DATA" \
      --out "$dir/stage3_continued" --steps "$STAGE4_STEPS" "${RL_COMMON[@]}" --seed "$seed" $(resume_flag "$dir/stage3_continued")
    models+=(--model "$dir/stage3_continued" --name stage3_continued)
    run "abl_${seed}_eval" python eval.py --data "$DATA" --split val --out "$dir/eval" --device "$DEVICE" "${models[@]}"
    results+=("$dir/eval/results.json")
  done
  echo; echo "Clip ablation (val split, mean +- std over seeds, %):"
  python eval.py --aggregate "${results[@]}" --out "$OUT/ablation"
fi
