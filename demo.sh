#!/usr/bin/env bash
# Diffusion-4K in miniature on real photos (CPU, no weights, no network but the package registry): sets up .venv in
# the repository if needed, then demo.py pretrains a tiny SD3 and a tiny Flux on the scikit-image photos (miniature.py,
# cached), converts their VAE to F=16, fine-tunes with WLF under DeepSpeed ZeRO-2, generates, evaluates, and writes
# summary.png to --out (default demo_out/ in the folder you run it from). Running it again reuses what is done.
# Extra arguments go to demo.py; times and disk: README.md, BENCHMARKS.md.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")" && pwd)
PY="$ROOT/.venv/bin/python"
if ! [ -x "$PY" ] || ! "$PY" -c "import diffusers, deepspeed, torchmetrics, open_clip, pywt, skimage" 2>/dev/null; then
  echo "demo.sh: installing requirements.lock into $ROOT/.venv, once: about 3 GB to download, 6.6 GB on disk," \
       "a few minutes on a fast connection (README.md)"
  python3 -m venv "$ROOT/.venv"
  "$ROOT/.venv/bin/pip" install -r "$ROOT/requirements.lock"  # the tested versions, with pip's progress bars
fi
export HF_HUB_OFFLINE=1
exec "$PY" "$ROOT/demo.py" "$@"
