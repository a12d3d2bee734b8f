"""A training run's folder, shared by train_sd3.py / train_flux.py (training.py) and train_sc_vae.py: its checkpoint-N
folders (listed, found, written atomically, pruned, resumed from) and the checks before a run reuses the folder.

checkpoint-N holds accelerate's state (model, optimiser, schedule, registered objects) and trainer_state.json (the
step, the skipped images, the run's flags); a folder still being written is checkpoint-N.tmp and never counts.
"""
import json
import os
import shutil
from pathlib import Path

from accelerate.logging import get_logger
from accelerate.utils import gather_object

import outputs
from errors import UsageError

logger = get_logger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE = "trainer_state.json"  # in each checkpoint-N: the step, the problems, the settings
# Flags a resume may change: they only extend or observe the run (every other flag defines it).
EXTENDING_FLAGS = {"max_train_steps", "checkpointing_steps", "checkpoints_total_limit", "resume_from_checkpoint",
                   "validation_prompt", "validation_steps", "num_validation_images", "report_to",
                   "dataloader_num_workers", "output_dir", "data_cache_dir", "gradient_checkpointing",
                   "overwrite_output_dir", "accept_changed_settings", "check_only"}


#################################################################################
#                                  Checkpoints                                  #
#################################################################################

def list_checkpoints(output_dir):
    """[(step, path)] of the complete checkpoints in output_dir, oldest first (`.tmp` ones are unfinished)."""
    found = []
    for path in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*"):
        step = path.name[len(CHECKPOINT_PREFIX):]
        if path.is_dir() and step.isdigit():
            found.append((int(step), path))
    return sorted(found)


def find_checkpoint(output_dir, resume_from_checkpoint):
    """The checkpoint folder to resume from: "latest" (None when there is none yet) or a given path / name."""
    if resume_from_checkpoint == "latest":
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    path = Path(resume_from_checkpoint)
    path = path if path.is_dir() else Path(output_dir) / path
    if not (path / TRAINER_STATE).is_file():
        raise UsageError(f"--resume_from_checkpoint {resume_from_checkpoint}: {path} is not a checkpoint folder "
                         f"written by this trainer (no {TRAINER_STATE}). Use 'latest' or a {CHECKPOINT_PREFIX}N "
                         f"folder of {output_dir}.")
    return path


def remove_unfinished(output_dir):
    """Remove the checkpoint-N.tmp folders a killed or failed save left behind."""
    for unfinished in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*.tmp"):
        shutil.rmtree(unfinished)
        logger.warning(f"Removed {unfinished}: a checkpoint whose writing was interrupted")


def resume(accelerator, output_dir, resume_from_checkpoint, problems):
    """Remove unfinished checkpoints; load the one asked for (accelerate's state, and the images `problems`, a
    accelerated.DataProblems, had skipped); return its step (0: a new run)."""
    if accelerator.is_main_process:
        remove_unfinished(output_dir)
    checkpoint = find_checkpoint(output_dir, resume_from_checkpoint) if resume_from_checkpoint else None
    if checkpoint is None:
        if resume_from_checkpoint:
            logger.info(f"No checkpoint in {output_dir}: starting a new run")
        return 0
    accelerator.load_state(str(checkpoint))
    state = json.loads((checkpoint / TRAINER_STATE).read_text())
    problems.restore(state)
    logger.info(f"Resumed from {checkpoint} at step {state['global_step']}")
    return state["global_step"]


def save_checkpoint(accelerator, output_dir, step, trainer_state, total_limit=None, save_model=None):
    """accelerator.save_state (and `save_model(folder)`, called on every process, e.g. the diffusers transformer/ the
    generation scripts load) into checkpoint-N.tmp, then rename it to checkpoint-N, then prune the oldest beyond
    `total_limit`. Call it on every process.

    A failed write (a full disk) removes the .tmp folder and raises UsageError; older checkpoints are untouched.
    """
    final = Path(output_dir) / f"{CHECKPOINT_PREFIX}{step}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    problem = None
    try:
        accelerator.save_state(str(tmp))
        if save_model is not None:
            save_model(tmp)
        if accelerator.is_main_process:
            (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state))
    except Exception as error:  # any failed write: disk full, quota, I/O error
        problem = f"{type(error).__name__}: {error}"
    problems = [p for p in gather_object([problem]) if p]
    if problems:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = list_checkpoints(output_dir)
        kept = f"the previous checkpoint {previous[-1][1]} is intact" if previous else "no earlier checkpoint exists"
        raise UsageError(f"Could not write checkpoint {final} ({problems[0]}); {kept}. Free disk space in "
                         f"{output_dir}, then resume with --resume_from_checkpoint latest.")
    if accelerator.is_main_process:
        old = final.with_name(final.name + ".old")
        if final.exists():  # a re-run after resuming from an earlier step: the old folder goes only once replaced
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        for _, path in list_checkpoints(output_dir)[:-total_limit] if total_limit else []:
            shutil.rmtree(path)
            logger.info(f"Removed {path} (--checkpoints_total_limit {total_limit})")
    accelerator.wait_for_everyone()
    logger.info(f"Saved {final}")
    return final


#################################################################################
#                       One run per folder, resumed as it was                   #
#################################################################################

def run_settings(args):
    """The run's flags as JSON values (tuples as lists), as train_summary.json and each checkpoint record them."""
    return json.loads(json.dumps({k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
                                 default=str))


def holds_run(output_dir, run_files):
    """What in `output_dir` belongs to an earlier run (`run_files`: its logs and saved model; checkpoints), or []."""
    output_dir = Path(output_dir)
    found = [name for name in run_files if (output_dir / name).exists()]
    return found + sorted(p.name for p in output_dir.glob(f"{CHECKPOINT_PREFIX}*"))


def changed_settings(saved, current, extending=EXTENDING_FLAGS):
    """["--flag: old -> new"] for each defining flag whose value differs from the run's recorded one (flags the
    record lacks, added to the trainer since, are not compared)."""
    return [f"--{k}: {saved[k]!r} -> {current[k]!r}" for k in current
            if k in saved and k not in extending and saved[k] != current[k]]


def check_output_dir(args, output_dir, run_files, extending=EXTENDING_FLAGS):
    """Refuse an --output_dir holding an earlier run unless resuming it (with the settings that define it, unless
    --accept_changed_settings) or --overwrite_output_dir. Reads only: nothing is written here."""
    earlier = holds_run(output_dir, run_files)
    if earlier and not args.resume_from_checkpoint and not args.overwrite_output_dir:
        raise UsageError(f"--output_dir {output_dir} already holds a run ({', '.join(earlier[:4])}): continue it with "
                         f"--resume_from_checkpoint latest, replace it with --overwrite_output_dir, or choose another "
                         f"--output_dir.")
    checkpoint = find_checkpoint(output_dir, args.resume_from_checkpoint) if args.resume_from_checkpoint else None
    if checkpoint is None:
        return
    saved = json.loads((checkpoint / TRAINER_STATE).read_text()).get("settings", {})
    changed = changed_settings(saved, run_settings(args), extending)
    if changed and not args.accept_changed_settings:
        raise UsageError(f"{checkpoint} was trained with other settings ({'; '.join(changed)}): resume with the same "
                         f"flags, add --accept_changed_settings to continue with the new ones, or start a new run in "
                         f"another --output_dir.")


def clear_run(output_dir):
    """Remove everything of an earlier run from output_dir (--overwrite_output_dir) except the caches and the lock."""
    for path in Path(output_dir).iterdir():
        if path.name in ("cache", outputs.LOCK_NAME):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    logger.info(f"Removed the earlier run in {output_dir} (--overwrite_output_dir)")


#################################################################################
#                          Flags of every trainer's run folder                  #
#################################################################################

def add_checkpoint_flags(parser):
    """The checkpoint and resume flags of every trainer (diffusers' names); the trainer sets --checkpointing_steps's
    default (parser.set_defaults)."""
    parser.add_argument("--checkpointing_steps", type=int, help="save a checkpoint every N optimiser steps")
    parser.add_argument("--checkpoints_total_limit", type=int, default=None, help="keep only the newest N checkpoints")
    parser.add_argument("--resume_from_checkpoint", default=None, help='"latest" or a checkpoint-N folder')
    parser.add_argument("--overwrite_output_dir", action="store_true",
                        help="remove an earlier run in --output_dir (its caches are kept) and start a new one")
    parser.add_argument("--accept_changed_settings", action="store_true",
                        help="resume although flags that define the run (model, data, resolution, learning rate, "
                             "loss, seed, batch, ...) differ from the checkpoint's (whose model, optimizer and "
                             "schedule states are restored as saved)")
