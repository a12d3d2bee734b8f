#!/bin/bash
# The launch both train_sd3.sh and train_flux.sh share: the authors' 4096x4096 settings (PROTOCOL.md §4),
# DeepSpeed ZeRO-2 with the optimizer on the CPU (ds_config.yaml), bf16, a global batch of GLOBAL_BATCH=32 images
# (gradient accumulation fills what PER_DEVICE_BATCH x NUM_PROCESSES leaves); lr 1e-6 constant, 20,000 steps, a
# checkpoint every 5,000 and gradient checkpointing are the trainer's defaults. The authors also pass --use_8bit_adam:
# with the optimizer offloaded DeepSpeed runs its own CPU AdamW, so the trainer refuses it and it is left out.
# Needs TRAIN_SCRIPT, MODEL_DIR, OUTPUT_DIR, NUM_PROCESSES, PER_DEVICE_BATCH; flags pass through. MIXED_PRECISION
# overrides ds_config.yaml's bf16 (the CPU: no). The flags are checked first in one plain process (PYTHON, default
# python, with --check_only): a mistake ends the script in one line before accelerate starts anything.
# Several machines: run it on each with NUM_MACHINES, MACHINE_RANK (0 on the main one), MAIN_PROCESS_IP (the main
# machine's address) and optionally MAIN_PROCESS_PORT (29500); NUM_PROCESSES counts the processes of all machines.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)

DATA_DIR=${DATA_DIR:-./data/Aesthetic-4K/train}
GLOBAL_BATCH=${GLOBAL_BATCH:-32}  # the paper: 32 images per optimiser step (their ds_config.yaml: SD3 64, Flux 32)
ACCUMULATION=$(( GLOBAL_BATCH / (PER_DEVICE_BATCH * NUM_PROCESSES) ))
if (( ACCUMULATION < 1 || ACCUMULATION * PER_DEVICE_BATCH * NUM_PROCESSES != GLOBAL_BATCH )); then
  echo "error: a global batch of $GLOBAL_BATCH images is not $PER_DEVICE_BATCH images x $NUM_PROCESSES processes x a" \
       "whole number of accumulation steps: change NUM_PROCESSES or GLOBAL_BATCH." >&2
  exit 1
fi

MACHINES=()
if (( ${NUM_MACHINES:-1} > 1 )); then
  MACHINES=(--num_machines "$NUM_MACHINES"
            --machine_rank "${MACHINE_RANK:?set MACHINE_RANK on each machine: 0 on the main one, then 1, 2, ...}"
            --main_process_ip "${MAIN_PROCESS_IP:?set MAIN_PROCESS_IP to the address of the main machine}"
            --main_process_port "${MAIN_PROCESS_PORT:-29500}")
fi

export TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

PRECISION=()
if [ -n "${MIXED_PRECISION:-}" ]; then PRECISION=(--mixed_precision "$MIXED_PRECISION"); fi

# Every other setting is the trainer's default (training.build_parser, models.MODELS): see `TRAIN_SCRIPT --help`.
FLAGS=(--pretrained_model_name_or_path "$MODEL_DIR"
       --instance_data_dir "$DATA_DIR"
       --output_dir "$OUTPUT_DIR"
       --train_batch_size "$PER_DEVICE_BATCH"
       --gradient_accumulation_steps "$ACCUMULATION"
       "$@")
"${PYTHON:-python}" "$HERE/$TRAIN_SCRIPT" "${FLAGS[@]}" --check_only
accelerate launch --config_file "$HERE/ds_config.yaml" --num_processes "$NUM_PROCESSES" "${MACHINES[@]}" \
  "${PRECISION[@]}" "$HERE/$TRAIN_SCRIPT" "${FLAGS[@]}"
