#!/usr/bin/env bash
# Diffusion-4K in miniature on real photos (CPU, no weights, no network but the package registry): sets up .venv if
# needed, then demo.py pretrains a tiny SD3 and a tiny Flux on the scikit-image photos (miniature.py, cached), converts
# their VAE to F=16, fine-tunes with WLF under DeepSpeed ZeRO-2, generates, evaluates, writes demo_out/summary.png.
# Running it again reuses what is done. Extra arguments go to demo.py.
set -euo pipefail
cd "$(dirname "$0")"
PY=.venv/bin/python
if ! [ -x "$PY" ] || ! "$PY" -c "import diffusers, deepspeed, torchmetrics, open_clip, pywt, skimage" 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/pip install -q -r requirements.lock  # the tested versions (README, "Installing")
fi
export HF_HUB_OFFLINE=1
exec "$PY" demo.py "$@"
