#!/usr/bin/env bash
# Wheels the GPU machine lacks (its image has torch 2.11, triton, accelerate, peft, transformers 5.17, but no trl,
# datasets, pydantic, liger-kernel or bitsandbytes), pinned to what the test suite runs here. Run once in the
# repository root; `.whl/` is ignored by git and travels with `carry: [".whl"]`. About 61 MB (bitsandbytes: 43 MB).
#   bash scripts/bench/gpu_wheels.sh            # LoRA and QLoRA
#   bash scripts/bench/gpu_wheels.sh --no-bnb   # LoRA only (a smaller working tree)
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
exclude="$(git rev-parse --git-common-dir)/info/exclude"
mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
mkdir -p .whl
wheels=(trl==1.16.0 transformers==5.23.0 datasets==5.2.0 peft==0.21.2 accelerate==1.15.0 liger-kernel==0.8.5
        pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
        dill==0.4.1 multiprocess==0.70.19)
[[ "${1:-}" == "--no-bnb" ]] || wheels+=(bitsandbytes==0.50.2)
for wheel in "${wheels[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$wheel"
done
du -sh .whl
