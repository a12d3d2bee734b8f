#!/bin/bash
# SC-VAE decoder training with the authors' settings (their sc-vae launch script): FLUX.1-dev's VAE, SA-1B 512x512
# crops, 32 images per GPU x 2 accumulation steps x NUM_PROCESSES=4 GPUs, fp32, AdamW lr 1e-5 for the decoder and the
# discriminator, weight decay 1e-4, one epoch, constant schedule, EMA, a checkpoint every 10,000 steps,
# LPIPS-VGG 0.1, GAN 0.05, scale consistency 1. Paths come from the environment; extra flags pass through, e.g.
#   MODEL_DIR=... DATA_DIR=... LPIPS_BACKBONE=.../vgg16-397923af.pth ./train_sc_vae.sh --resume_from_checkpoint latest
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)

MODEL_DIR=${MODEL_DIR:-./pretrain/FLUX.1-dev}
DATA_DIR=${DATA_DIR:-./data/sa-1b}
OUTPUT_DIR=${OUTPUT_DIR:-./outputs/sc-vae}
LPIPS_BACKBONE=${LPIPS_BACKBONE:-./pretrain/metrics/vgg16-397923af.pth}
NUM_PROCESSES=${NUM_PROCESSES:-4}

FLAGS=(
  --pretrained_model_name_or_path "$MODEL_DIR"
  --train_data_dir "$DATA_DIR"
  --output_dir "$OUTPUT_DIR"
  --mixed_precision no
  --resolution 512
  --train_batch_size 32
  --gradient_accumulation_steps 2
  --gradient_checkpointing
  --num_train_epochs 1
  --learning_rate 1e-5
  --discr_learning_rate 1e-5
  --lr_scheduler constant
  --lr_warmup_steps 0
  --adam_weight_decay 1e-4
  --lpips_scale 0.1
  --gen_scale 0.05
  --sc_scale 1
  --lpips_net vgg
  --lpips_backbone "$LPIPS_BACKBONE"
  --use_ema
  --seed 0
  --checkpointing_steps 10000
  "$@")
# One plain process checks the flags, model, data and output folder first (PYTHON, default python): a mistake then
# ends here in one line, before accelerate starts anything.
"${PYTHON:-python}" "$HERE/train_sc_vae.py" "${FLAGS[@]}" --check_only
accelerate launch --config_file "$HERE/sc_vae_config.yaml" --num_processes "$NUM_PROCESSES" "$HERE/train_sc_vae.py" \
  "${FLAGS[@]}"
