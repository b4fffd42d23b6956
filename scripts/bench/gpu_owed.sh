#!/usr/bin/env bash
# The GPU figures still owed, in one command and one table, so a session that draws a GPU spends its device time
# measuring, not preparing. The first run (one H200, 2026-11-29; figures in the README) showed each configuration
# costs 30-50 s of start-up (model build, imports) besides its timed steps, so the default runs what is still owed,
# in order of value, inside 9 minutes of time boxes:
#   1. SFT tokens/s against plain transformers + PEFT, LoRA 1B: HF at micro-batch 4 vs Wenmai's plan (sft_speed.py)
#   2. DPO pairs/s against TRL's DPOTrainer defaults, 1B shape (dpo_speed.py)
#   3. ZeRO-3 + QLoRA, Llama-3.2-1B shape: peak memory against the pre-flight estimate (qlora_zero3.py)
#   4. SFT tokens/s, LoRA 8B: HF at micro-batch 4 vs Wenmai's plan
# --all runs every configuration of every benchmark (QLoRA 8B, Liger and no-checkpointing HF rows, plain QLoRA
# memory): about 20 minutes, two device calls. Each part runs under its own time box; one that fails or runs out
# is a row saying so, and the others still run. Every part's JSON lines land in OUT/<part>.jsonl and its own table
# in OUT/<part>.md; OUT/owed.md is the one table.
#   bash scripts/bench/gpu_owed.sh [--tiny | --all] [--out DIR]
#   --tiny: the tiny shapes, a few steps each (what the CPU test runs: checks the harness, measures nothing)
# On the device machine: carry .whl (bash ../shared/device/wheels.sh, plus peft) and run with PYTHONPATH=$PWD:/tmp/site.
set -uo pipefail
cd "$(dirname "$0")/../.."
tiny=0
all=0
out=runs/gpu-owed
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tiny) tiny=1; shift ;;
    --all) all=1; shift ;;
    --out) out="$2"; shift 2 ;;
    *) echo "usage: bash scripts/bench/gpu_owed.sh [--tiny | --all] [--out DIR]" >&2; exit 2 ;;
  esac
done
mkdir -p "$out"
py=${PYTHON:-python}

# part name | time box (s) | command
if [[ $tiny == 1 ]]; then
  parts=(
    "qlora_zero3|300|$py scripts/bench/qlora_zero3.py --shape tiny --steps 2 --seq-len 64 --workdir $out/work-qz"
    "sft_lora_tiny|200|$py scripts/bench/sft_speed.py --workload lora --shape tiny --steps 2 --warmup 1 --workdir $out/work-sft"
    "dpo_tiny|200|$py scripts/bench/dpo_speed.py --shape tiny --steps 3 --batch 2 --warmup-steps 1"
  )
elif [[ $all == 1 ]]; then
  parts=(
    "qlora_zero3|300|$py scripts/bench/qlora_zero3.py --shape 1b --workdir $out/work-qz"
    "sft_lora_1b|300|$py scripts/bench/sft_speed.py --workload lora --shape 1b --workdir $out/work-sft"
    "sft_lora_8b|420|$py scripts/bench/sft_speed.py --workload lora --shape 8b --workdir $out/work-sft"
    "sft_qlora_8b|200|$py scripts/bench/sft_speed.py --workload qlora --shape 8b --workdir $out/work-sft"
    "dpo_1b|150|$py scripts/bench/dpo_speed.py --shape 1b"
  )
else
  parts=(
    "sft_lora_1b|100|$py scripts/bench/sft_speed.py --workload lora --shape 1b --configs hf-gc-b4,wenmai --workdir $out/work-sft"
    "dpo_1b|120|$py scripts/bench/dpo_speed.py --shape 1b"
    "qlora_zero3|150|$py scripts/bench/qlora_zero3.py --shape 1b --configs zero3 --workdir $out/work-qz"
    "sft_lora_8b|160|$py scripts/bench/sft_speed.py --workload lora --shape 8b --configs hf-gc-b4,wenmai --workdir $out/work-sft"
  )
fi

for part in "${parts[@]}"; do
  IFS='|' read -r name box command <<< "$part"
  echo "== $name (time box ${box}s): $command" >&2
  SECONDS=0
  timeout --kill-after=10 "$box" $command > "$out/$name.log" 2> "$out/$name.err"
  code=$?
  grep '^{' "$out/$name.log" > "$out/$name.jsonl" || true
  grep '^|' "$out/$name.log" > "$out/$name.md" || true
  echo "{\"part\": \"$name\", \"exit\": $code, \"seconds\": $SECONDS, \"box\": $box}" > "$out/$name.status.json"
  echo "   exit $code after ${SECONDS}s" >&2
done
$py scripts/bench/owed_table.py "$out" > "$out/owed.md"
cat "$out/owed.md"
