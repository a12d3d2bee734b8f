#!/usr/bin/env bash
# Diffusion-4K in miniature: set up, build tiny checkpoints, generate. Output: ${DEMO_OUT:-demo_out}/
set -euo pipefail
cd "$(dirname "$0")"
OUT="${DEMO_OUT:-demo_out}"
PY=.venv/bin/python
if ! [ -x "$PY" ] || ! "$PY" -c "import diffusers, deepspeed, torchmetrics, open_clip" 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/pip install -q -r requirements.txt
fi
export HF_HUB_OFFLINE=1
mkdir -p "$OUT"
[ -f "$OUT/ckpt/tiny-sd3/model_index.json" ] || "$PY" tiny_models.py --out "$OUT/ckpt"
