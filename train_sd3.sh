#!/bin/bash
# WLF fine-tuning of SD3-medium at 4096x4096 with the authors' settings (train_4k.sh): 8 images per GPU on
# NUM_PROCESSES=2 GPUs, T5 length 77, logit-normal timesteps (models.py). Paths come from the environment; extra flags pass through, e.g.
#   MODEL_DIR=... DATA_DIR=... ./train_sd3.sh --resume_from_checkpoint latest
set -euo pipefail
export TRAIN_SCRIPT=train_sd3.py PER_DEVICE_BATCH=8
export MODEL_DIR=${MODEL_DIR:-./pretrain/stable-diffusion-3-medium-diffusers}
export OUTPUT_DIR=${OUTPUT_DIR:-./outputs/sd3-wlf}
export NUM_PROCESSES=${NUM_PROCESSES:-2}
exec "$(dirname "$0")/train_4k.sh" "$@"
