#!/bin/bash
# WLF fine-tuning of FLUX.1-dev at 4096x4096 with the authors' settings (train_4k.sh): 4 images per GPU on
# NUM_PROCESSES=8 GPUs, T5 length 77 and uniform timesteps (`--weighting_scheme none`), guidance embedding 3.5: the
# defaults of their Flux trainer, which their launch script keeps (models.py, PROTOCOL.md §4). Paths come from the
# environment; extra flags pass through, e.g.   MODEL_DIR=... DATA_DIR=... ./train_flux.sh --resume_from_checkpoint latest
set -euo pipefail
export TRAIN_SCRIPT=train_flux.py PER_DEVICE_BATCH=4
export MODEL_DIR=${MODEL_DIR:-./pretrain/FLUX.1-dev}
export OUTPUT_DIR=${OUTPUT_DIR:-./outputs/flux-wlf}
export NUM_PROCESSES=${NUM_PROCESSES:-8}
exec "$(dirname "$0")/train_4k.sh" "$@"
