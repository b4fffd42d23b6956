#!/usr/bin/env bash
# Wheels the GPU machine lacks (its image has torch 2.11, triton, accelerate 1.15 and transformers 5.17, within
# Wenmai's bounds, but no trl, datasets, pydantic, liger-kernel, bitsandbytes or DeepSpeed, and maybe an older
# peft), pinned to what the test suite runs here. Run once in the repository root; `.whl/` is ignored by git and
# travels with `carry: [".whl"]`. About 50 MB (bitsandbytes: 43 MB); the working tree and the wheels must stay
# under the device tool's 64 MiB. The first H200 run (2026-11-29) used exactly this set.
#   bash scripts/bench/gpu_wheels.sh            # LoRA and QLoRA
#   bash scripts/bench/gpu_wheels.sh --no-bnb   # LoRA only (a smaller working tree)
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
exclude="$(git rev-parse --git-common-dir)/info/exclude"
mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
mkdir -p .whl
wheels=(trl==1.16.0 datasets==5.2.0 peft==0.21.2 liger-kernel==0.8.5 hjson==3.1.0
        pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
        dill==0.4.1 multiprocess==0.70.19)
[[ "${1:-}" == "--no-bnb" ]] || wheels+=(bitsandbytes==0.50.2)
for wheel in "${wheels[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$wheel"
done
# DeepSpeed is published as source only: a pure-Python wheel built here (its ops compile at run time, on the GPU)
if ! ls .whl/deepspeed-*.whl >/dev/null 2>&1; then
  tmp=$(mktemp -d)
  python3 -m venv "$tmp/v" && "$tmp/v/bin/pip" install -q wheel setuptools
  DS_BUILD_OPS=0 "$tmp/v/bin/pip" wheel -q --no-deps --no-build-isolation deepspeed==0.19.8 -w .whl
  rm -rf "$tmp"
fi
du -sh .whl
