"""What every trainer (training.py for SD3 / Flux, train_sc_vae.py) shares on accelerate: the Accelerator with its
launch check, the noise generator of each micro-batch, the bookkeeping of skipped images merged over the processes,
and the run's command-line flags."""
import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

import diffusers
import numpy as np
import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, gather_object, parse_flag_from_env

from errors import UsageError

logger = get_logger(__name__)

MAX_LISTED = 50  # problems listed by name in train_summary.json (all are counted)


#################################################################################
#                          The Accelerator and its launch                       #
#################################################################################

def launched_processes():
    """How many processes the launcher started (torchrun and `accelerate launch` set WORLD_SIZE; 1 without one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_cpu_job(launched):
    """Whether the launched processes should form one CPU job (gloo): several of them, no GPU, no DeepSpeed.

    Without this, `accelerate launch --multi_gpu` on a machine without GPUs gives every process a single-process
    run of its own, all writing to one output folder."""
    return launched > 1 and not torch.cuda.is_available() and not parse_flag_from_env("ACCELERATE_USE_DEEPSPEED")


def check_launch(accelerator, launched):
    """Stop before anything is written unless the launched processes form one job (PROTOCOL.md §8)."""
    if accelerator.num_processes != launched:
        raise UsageError(
            f"launch problem: the launcher started {launched} processes but each runs alone "
            f"({accelerator.distributed_type.value}, {accelerator.num_processes} process), so they would train "
            f"independent copies into one output folder. DeepSpeed through accelerate needs one GPU per process: on "
            f"the CPU use --num_processes 1, or plain processes (`accelerate launch --multi_gpu --num_processes N` "
            f"without the DeepSpeed config, or `ACCELERATE_USE_CPU=true torchrun --nproc_per_node N`).")


def is_built(builder):
    """Whether torch's extension folder ($TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions/pyXY_cuZZZ) holds a
    finished build of a DeepSpeed op made from this installation: the library, ninja's log of the build, and a
    build.ninja naming this torch's headers and this DeepSpeed's sources (a build from another venv or path is
    rebuilt, since torch rewrites build.ninja and ninja sees new commands)."""
    from torch.utils.cpp_extension import _get_build_directory

    folder = Path(_get_build_directory(builder.NAME, verbose=False))
    if not all((folder / name).is_file() for name in (f"{builder.NAME}.so", ".ninja_log", "build.ninja")):
        return False
    recipe = (folder / "build.ninja").read_text()
    paths = [os.path.join(os.path.dirname(os.path.abspath(torch.__file__)), "include"),
             *(os.path.abspath(builder.deepspeed_src_path(source)) for source in builder.sources())]
    return all(path in recipe for path in paths)


def deepspeed_builds_pending(offload_optimizer):
    """The DeepSpeed ops this job will compile before it starts (cpu_adam when the optimizer is offloaded; on the CPU
    also the shared-memory communication op): those neither installed prebuilt with DeepSpeed nor built (is_built)."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops

    pending = []
    for name in ("CPUAdamBuilder", "ShareMemCommBuilder") if offload_optimizer else ("ShareMemCommBuilder",):
        builder = get_accelerator().create_op_builder(name)
        if (builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False)
                or installed_ops.get(builder.NAME, False)):
            continue  # never built (this accelerator has no such op), or shipped prebuilt
        if not is_built(builder):
            pending.append(builder.NAME)
    return pending


def say_deepspeed_builds():
    """Under a DeepSpeed launch, say before the silent one-time compile of its ops that it is coming (once a node)."""
    if not parse_flag_from_env("ACCELERATE_USE_DEEPSPEED") or os.environ.get("LOCAL_RANK", "0") != "0":
        return
    offload = os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none") not in ("none", "")
    pending = deepspeed_builds_pending(offload)
    if pending:
        name = "cpu_adam" if "cpu_adam" in pending else pending[0]
        print(f"compiling DeepSpeed's {name} (first run only, ~1–2 min)", flush=True)


def make_accelerator(output_dir, gradient_accumulation_steps, mixed_precision, report_to):
    """The run's Accelerator (precision: the flag, else accelerate's, else bf16); quiet transformers and diffusers.

    Refuses a launch whose processes would not form one job; several CPU processes become one gloo job."""
    say_deepspeed_builds()  # the Accelerator builds DeepSpeed's communication op, the optimizer its cpu_adam
    launched = launched_processes()
    accelerator = Accelerator(
        cpu=is_cpu_job(launched),
        gradient_accumulation_steps=gradient_accumulation_steps,
        mixed_precision=mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "bf16"),
        log_with=None if report_to == "none" else report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    check_launch(accelerator, launched)
    output_dir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    for library in (transformers, diffusers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()
    # Recent diffusers renamed `torch_dtype` to `dtype`; the older ones requirements.txt allows know only `torch_dtype`.
    warnings.filterwarnings("ignore", message=".*`dtype` instead.*", category=FutureWarning)
    return accelerator


def checked_only(data):
    """Start accelerate's state for a --check_only process (its checks warn through accelerate's logger) and
    return the line it ends with, naming what it found in `data` (a callable returning a count of images)."""
    from accelerate import PartialState

    PartialState()
    images = data()
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "the trainer"
    print(f"{script} --check_only: the flags, the model, the data ({images} images) and --output_dir are fine; "
          f"nothing was trained.", flush=True)
    return None


def end_run(accelerator):
    """Wait for every process, close the trackers, and tear the process group down now (not in a rank's exit)."""
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def step_generator(seed, step, micro_step, rank, device):
    """A torch.Generator for one micro-batch, seeded from (seed, step, micro-step, process): resumable exactly."""
    state = np.random.SeedSequence([seed, step, micro_step, rank]).generate_state(2, np.uint64)[0]
    return torch.Generator(device).manual_seed(int(state) & (2**63 - 1))


#################################################################################
#                         Skipped images, over the processes                    #
#################################################################################

def gather_union(items):
    """The sorted union of `items` over all processes."""
    return sorted(set().union(*gather_object([sorted(items)])))


def warn_problems(what, problems):
    """Log a count and the first few examples of one kind of skipped input."""
    if problems:
        logger.warning(f"{len(problems)} {what} skipped: " + "; ".join(problems[:5]) + (" ..." if problems[5:] else ""))


class DataProblems:
    """The inputs a run skips or up-scales: bad metadata lines and missing images (found at start), unreadable and
    up-scaled images (by any process, each warned about once, named "FILE: why" with FILE relative to the data
    folder), merged over the processes when saved."""

    def __init__(self, found):
        self.metadata_lines, self.missing_images = found["metadata_lines"], found["missing_images"]
        self.corrupt_images, self.upscaled_images = set(), set()

    def note(self, batch):
        """Add a batch's unreadable and up-scaled images, with a warning for each one not seen before."""
        notes = ((self.corrupt_images, batch["unreadable"], "unreadable image skipped"),
                 (self.upscaled_images, batch["upscaled"], "image smaller than --resolution, up-scaled"))
        for seen, new, what in notes:
            for item in sorted(set(new) - seen):
                seen.add(item)
                logger.warning(f"{what}: {item}", main_process_only=False)

    def restore(self, trainer_state):
        """Add the images a checkpoint's trainer_state.json lists (an SC-VAE checkpoint written before both trainers
        shared this record lists its unreadable images as "skipped_images")."""
        self.corrupt_images.update(trainer_state.get("corrupt_images", trainer_state.get("skipped_images", [])))
        self.upscaled_images.update(trainer_state.get("upscaled_images", []))

    def gather(self):
        """The image lists merged over every process (call it on all of them), as trainer_state.json holds them."""
        return {"corrupt_images": gather_union(self.corrupt_images),
                "upscaled_images": gather_union(self.upscaled_images)}

    def summary(self, gathered):
        """train_summary.json's counts and names (the first MAX_LISTED of each kind), from gather()'s lists."""
        lists = {"metadata_lines": self.metadata_lines, "missing_images": self.missing_images, **gathered}
        return {"skipped": {kind: len(items) for kind, items in lists.items() if kind != "upscaled_images"},
                "upscaled_images": len(gathered["upscaled_images"]),
                "problems": {kind: items[:MAX_LISTED] for kind, items in lists.items()}}


#################################################################################
#                          Flags every trainer's run has                        #
#################################################################################

# Set by each trainer (parser.set_defaults): its paper's or authors' values.
TRAINER_DEFAULTS = ("train_batch_size", "gradient_accumulation_steps", "gradient_checkpointing", "max_train_steps",
                    "learning_rate", "mixed_precision", "num_validation_images")


def add_run_flags(parser):
    """The flags of an accelerate training run, named as in diffusers' example trainers; the values that differ
    between the trainers (TRAINER_DEFAULTS) each trainer sets with parser.set_defaults."""
    parser.add_argument("--seed", type=int, default=0, help="seeds the data order, crops, flips and every noise draw")
    parser.add_argument("--random_flip", action=argparse.BooleanOptionalAction, default=True,
                        help="random horizontal flip (the authors' code always flips)")
    parser.add_argument("--dataloader_num_workers", type=int, default=0)
    parser.add_argument("--train_batch_size", type=int, help="per device")
    parser.add_argument("--gradient_accumulation_steps", type=int)
    parser.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction,
                        help="recompute activations in the backward pass; off: faster, more memory")
    parser.add_argument("--max_train_steps", type=int, help="optimiser steps")
    parser.add_argument("--learning_rate", type=float)
    parser.add_argument("--lr_scheduler", default="constant",
                        help="a diffusers.optimization schedule (paper, authors: constant)")
    parser.add_argument("--lr_warmup_steps", type=int, default=0)
    parser.add_argument("--adam_beta1", type=float, default=0.9)
    parser.add_argument("--adam_beta2", type=float, default=0.999)
    parser.add_argument("--adam_weight_decay", type=float, default=1e-4, help="authors: 1e-4")
    parser.add_argument("--adam_epsilon", type=float, default=1e-8)
    parser.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient-norm clip (also DeepSpeed's)")
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"],
                        help="None: what `accelerate launch` says, else bf16")
    parser.add_argument("--num_validation_images", type=int)
    parser.add_argument("--validation_steps", type=int, default=1000)
    parser.add_argument("--report_to", default="tensorboard", help='an accelerate tracker, or "none"')
    parser.add_argument("--check_only", action="store_true",
                        help="check every flag, the model, the data and the output folder, then stop without training: "
                             "the .sh launch scripts run it in one plain process before `accelerate launch`, so that a "
                             "mistake is one line, not a launcher's traceback")
