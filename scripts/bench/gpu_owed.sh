#!/usr/bin/env bash
# The GPU figures owed since the first round, in one command and one table, so the first session that draws a
# GPU spends its device time measuring, not preparing. On one H200 the parts' time boxes add up to 8 min 40 s:
#   1. QLoRA and ZeRO-3 + QLoRA, Llama-3.2-1B shape: peak memory against the pre-flight estimate (qlora_zero3.py)
#   2. SFT tokens/s against plain transformers + PEFT: LoRA 1B, LoRA 8B, QLoRA 8B (sft_speed.py)
#   3. DPO pairs/s against TRL's DPOTrainer defaults, 1B shape (dpo_speed.py)
# Each part runs under its own time box; one that fails or runs out is a row saying so, and the others still run.
# Every part's JSON lines land in OUT/<part>.jsonl and its own table in OUT/<part>.md; OUT/owed.md is the one table.
#   bash scripts/bench/gpu_owed.sh [--tiny] [--out DIR]
#   --tiny: the tiny shapes, a few steps each (what the CPU test runs: checks the harness, measures nothing)
# On the device machine: carry .whl (bash scripts/bench/gpu_wheels.sh) and run with PYTHONPATH=$PWD:/tmp/site.
set -uo pipefail
cd "$(dirname "$0")/../.."
tiny=0
out=runs/gpu-owed
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tiny) tiny=1; shift ;;
    --out) out="$2"; shift 2 ;;
    *) echo "usage: bash scripts/bench/gpu_owed.sh [--tiny] [--out DIR]" >&2; exit 2 ;;
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
else
  parts=(
    "qlora_zero3|110|$py scripts/bench/qlora_zero3.py --shape 1b --workdir $out/work-qz"
    "sft_lora_1b|80|$py scripts/bench/sft_speed.py --workload lora --shape 1b --workdir $out/work-sft"
    "sft_lora_8b|130|$py scripts/bench/sft_speed.py --workload lora --shape 8b --workdir $out/work-sft"
    "sft_qlora_8b|130|$py scripts/bench/sft_speed.py --workload qlora --shape 8b --workdir $out/work-sft"
    "dpo_1b|70|$py scripts/bench/dpo_speed.py --shape 1b"
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
