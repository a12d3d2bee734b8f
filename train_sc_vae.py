"""SC-VAE decoder training (the Scale Consistent VAE of arXiv 2506.01331) on accelerate.

Student: the pretrained F=8 VAE made F=16 (partitioned_vae.make_f16_vae); only its decoder trains. Teacher: a frozen
copy of the F=8 VAE. Generator steps minimise
    MSE(x_hat, x) + l_lpips LPIPS(x_hat, x) + l_gen w (-mean D(x_hat)) + l_sc MSE(f_t, up2(f_s)),
w = |grad_W LPIPS| / max(|grad_W gen|, 1e-8), at most 1e4 (VQGAN's adaptive weight; W = the decoder's last conv);
f_s, f_t = the student's (H/2) and teacher's (H) input to that conv. Discriminator steps alternate with them, one
optimiser step each: hinge loss plus 10 x a gradient penalty on real images. The final OUTPUT_DIR/vae holds the EMA
weights (--use_ema) as a diffusers VAE folder that partitioned_vae.load_f16_vae reads.
"""
import argparse
import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from PIL import Image
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import checkpoints
import outputs
from accelerated import DataProblems, add_run_flags, checked_only, end_run, make_accelerator, step_generator
from checkpoints import (add_checkpoint_flags, check_output_dir, clear_run, holds_run, resume, run_settings,
                         save_checkpoint)
from errors import HelpFormatter, UsageError, check_at_least, exit_on_usage_error
from imagefolder import (IMAGE_ERRORS, IMAGE_SUFFIXES, KeyedImages, StreamSampler, collate, crop_pixels, find_images,
                         is_upscaled, list_images, load_image)
from partitioned_vae import DECODE_MODES, load_vae, make_f16_vae
from reconstruction import LPIPS_BACKBONES, add_lpips_flags, load_lpips, pixel_metrics

logger = get_logger(__name__)

MAX_ADAPTIVE_WEIGHT = 1e4
RUN_FILES = ("train_summary.json", "vae")  # with checkpoint-N folders: what an earlier run leaves in --output_dir
# Flags a resume may change (checkpoints.EXTENDING_FLAGS, and these): every other flag defines the run.
EXTENDING_FLAGS = checkpoints.EXTENDING_FLAGS | {"num_train_epochs", "validation_data_dir"}


#################################################################################
#                                      Data                                     #
#################################################################################

class TrainImages(KeyedImages):
    """Random crops of the image files, keyed by (epoch, index) (imagefolder.KeyedImages). Images smaller than the
    resolution (up-scaled) are listed under "upscaled"; images are named relative to `root`, as in metadata.jsonl."""

    def __init__(self, paths, root, resolution, random_flip, seed):
        super().__init__(paths, random_flip, seed)
        self.root, self.resolution = Path(root), resolution

    def name(self, path):
        return Path(path).relative_to(self.root).as_posix()

    def read(self, path, flip, rng):
        image = load_image(path)
        upscaled = [self.name(path)] if is_upscaled(image, self.resolution) else []
        return {"pixels": crop_pixels(image, self.resolution, rng, flip), "upscaled": upscaled}


class Discriminator(nn.Module):
    """A patch discriminator in the style of Paella's / VQGAN's: spectral-norm stride-2 convs, instance norm,
    LeakyReLU, a 1x1 conv to one logit per patch (no sigmoid: the hinge loss needs raw logits)."""

    def __init__(self, channels=512, depth=6):
        super().__init__()
        widths = [channels // 2 ** max(depth - 3 - i, 0) for i in range(depth)]  # e.g. 64, 128, 256, 512, 512, 512
        layers = [nn.utils.spectral_norm(nn.Conv2d(3, widths[0], 3, stride=2, padding=1)), nn.LeakyReLU(0.2)]
        for c_in, c_out in zip(widths, widths[1:]):
            layers += [nn.utils.spectral_norm(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)),
                       nn.InstanceNorm2d(c_out), nn.LeakyReLU(0.2)]
        self.features = nn.Sequential(*layers)
        self.logits = nn.Conv2d(widths[-1], 1, 1)

    def forward(self, x):
        return self.logits(self.features(x))


def load_vaes(pretrained, vae_mode, grid=2):
    """(teacher, student): the F=8 VAE frozen, and its F=16 copy decoding in `vae_mode` with only the decoder trainable."""
    teacher = load_vae(pretrained, "f8", torch_dtype=torch.float32, flag="--pretrained_model_name_or_path")
    if teacher.config.get("f16_vae"):
        raise UsageError(f"--pretrained_model_name_or_path {pretrained} is an F=16 VAE (its config has 'f16_vae'); the "
                         f"teacher must be the pretrained F=8 VAE: pass the stock VAE or pipeline folder.")
    student = make_f16_vae(copy.deepcopy(teacher), vae_mode, grid)
    teacher.requires_grad_(False).eval()
    student.requires_grad_(False)
    student.decoder.requires_grad_(True)
    return teacher, student.train()


def reconstruct_with_features(vae, x, generator):
    """(decode(z) clamped to [-1, 1], the decoder's input to its last conv), z sampled from the posterior of x."""
    captured = {}
    handle = vae_module(vae).decoder.conv_out.register_forward_hook(lambda m, inputs, out: captured.update(f=inputs[0]))
    try:
        x_hat = vae(x, sample_posterior=True, generator=generator).sample
    finally:
        handle.remove()
    return x_hat.clamp(-1, 1), captured["f"]


def vae_module(model):
    """The model itself, or the one a DistributedDataParallel wrapper holds."""
    return getattr(model, "module", model)


#################################################################################
#                                     Losses                                    #
#################################################################################

def adaptive_weight(numerator_term, gen_term, last_layer):
    """VQGAN's balance |grad_W numerator| / max(|grad_W gen|, 1e-8), at most 1e4, as a constant."""
    numerator = torch.autograd.grad(numerator_term, last_layer, retain_graph=True)[0].norm()
    denominator = torch.autograd.grad(gen_term, last_layer, retain_graph=True)[0].norm()
    return (numerator / denominator.clamp(min=1e-8)).clamp(max=MAX_ADAPTIVE_WEIGHT).detach()


def generator_losses(x, x_hat, f_student, f_teacher, discriminator, lpips_metric, last_layer, scales):
    """{"mse", "lpips", "gen", "sc", "weight", "loss"} of one generator step (images in [-1, 1]).

    scales: (lpips, gen, sc). LPIPS is left out (0) without a metric; the generator term without a discriminator.
    With no LPIPS term the adaptive weight balances the MSE term instead.
    """
    lpips_scale, gen_scale, sc_scale = scales
    zero = x_hat.new_zeros(())
    terms = {"mse": F.mse_loss(x_hat.float(), x.float())}
    terms["lpips"] = lpips_metric(x_hat, x).mean() if lpips_metric is not None else zero
    terms["sc"] = F.mse_loss(F.interpolate(f_student.float(), scale_factor=2, mode="nearest"), f_teacher.float())
    terms["gen"], terms["weight"] = zero, zero
    if discriminator is not None:
        terms["gen"] = -discriminator(x_hat).mean()
        numerator = terms["lpips"] if lpips_metric is not None else terms["mse"]
        terms["weight"] = adaptive_weight(numerator, terms["gen"], last_layer)
    terms["loss"] = (terms["mse"] + lpips_scale * terms["lpips"] + gen_scale * terms["weight"] * terms["gen"]
                     + sc_scale * terms["sc"])
    return terms


def gradient_penalty(discriminator, x):
    """mean over images of (|grad_x sum D(x)| - 1)^2, on real images."""
    x = x.detach().requires_grad_(True)
    gradient = torch.autograd.grad(discriminator(x).sum(), x, create_graph=True)[0]
    return (gradient.flatten(1).norm(dim=1) - 1).pow(2).mean()


def discriminator_losses(discriminator, x, x_hat, gp_weight=10.0):
    """{"hinge", "gp", "loss"}: mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat))) + gp_weight * penalty."""
    hinge = F.relu(1 - discriminator(x)).mean() + F.relu(1 + discriminator(x_hat.detach())).mean()
    gp = gradient_penalty(discriminator, x)
    return {"hinge": hinge, "gp": gp, "loss": hinge + gp_weight * gp}


#################################################################################
#                                   Validation                                  #
#################################################################################

@torch.no_grad()
def log_validation(accelerator, vae, images, output_dir, step):
    """Reconstruct the validation images (posterior mean); log PSNR / SSIM and originals | reconstructions."""
    vae = vae_module(vae)
    vae.eval()
    x = images.to(accelerator.device)
    x_hat = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    vae.train()
    x01, x_hat01 = (x + 1) / 2, (x_hat + 1) / 2
    metrics = {f"val_{name}": float(value.mean()) for name, value in pixel_metrics(x01, x_hat01, ("psnr", "ssim")).items()}
    pairs = torch.cat([x01, x_hat01], dim=3)  # each original beside its reconstruction
    folder = Path(output_dir) / "validation"
    grid = (torch.cat(list(pairs), dim=1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    with outputs.atomic_path(folder / f"step-{step:06d}.png") as tmp:
        Image.fromarray(grid).save(tmp)
    accelerator.log(metrics, step=step)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", pairs.cpu(), step)
    logger.info(f"validation at step {step}: {metrics}")
    return metrics


def validation_images(args, train_paths):
    """Centre crops of the first --num_validation_images images of --validation_data_dir (default: the train set)."""
    folder = args.validation_data_dir
    paths = list_images(folder, f"--validation_data_dir {folder}", IMAGE_SUFFIXES)[0] if folder else train_paths
    crops = []
    for path in paths:
        if len(crops) == args.num_validation_images:
            break
        try:
            crops.append(crop_pixels(load_image(path), args.resolution))
        except IMAGE_ERRORS:
            continue
    return torch.stack(crops) if crops else None


#################################################################################
#                                  Training loop                                #
#################################################################################

def check_args(args):
    """UsageError for flags out of range or that cannot work together."""
    check_at_least(1, train_batch_size=args.train_batch_size,
                   gradient_accumulation_steps=args.gradient_accumulation_steps, num_train_epochs=args.num_train_epochs,
                   max_train_steps=args.max_train_steps, grid=args.grid,
                   checkpointing_steps=args.checkpointing_steps, checkpoints_total_limit=args.checkpoints_total_limit,
                   num_validation_images=args.num_validation_images, validation_steps=args.validation_steps,
                   discriminator_channels=args.discriminator_channels, discriminator_depth=args.discriminator_depth)
    check_at_least(0, dataloader_num_workers=args.dataloader_num_workers, lr_warmup_steps=args.lr_warmup_steps)
    if args.overwrite_output_dir and args.resume_from_checkpoint:
        raise UsageError("--overwrite_output_dir starts a new run and --resume_from_checkpoint continues one: give "
                         "one of them.")
    if args.resolution % 16 or args.resolution < 32:
        raise UsageError(f"--resolution {args.resolution} must be a multiple of 16 (the F=16 VAE), at least 32.")
    if args.gen_scale > 0 and args.resolution // 2 ** args.discriminator_depth < 2:
        raise UsageError(f"--resolution {args.resolution} is too small for --discriminator_depth "
                         f"{args.discriminator_depth}: its last map must be at least 2 x 2.")
    if args.lpips_scale > 0 and args.lpips_backbone is None:
        raise UsageError(f"--lpips_scale {args.lpips_scale} needs --lpips_backbone: {LPIPS_BACKBONES[args.lpips_net]} "
                         f"(or --lpips_scale 0 to train without LPIPS).")


@dataclass
class Models:
    """What trains and what it trains with: teacher, student, discriminator, their optimisers and schedules, EMA."""
    teacher: nn.Module
    student: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    lpips_metric: nn.Module = None
    discriminator: nn.Module = None
    d_optimizer: torch.optim.Optimizer = None
    d_scheduler: object = None
    ema: EMAModel = None


def create_models(args, accelerator, max_steps):
    """The frozen teacher, the student (decoder trainable), the discriminator, AdamW for both, EMA; prepared."""
    teacher, student = load_vaes(args.pretrained_model_name_or_path, args.vae_mode, args.grid)
    teacher.to(accelerator.device)
    if args.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    adamw = dict(betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon, weight_decay=args.adam_weight_decay)
    # Each optimiser steps on its own steps (half of them with a discriminator); accelerate steps a prepared
    # schedule once per process.
    own_steps = ((max_steps + 1) // 2 if args.gen_scale > 0 else max_steps) * accelerator.num_processes
    schedule = dict(num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes, num_training_steps=own_steps)
    optimizer = torch.optim.AdamW(student.decoder.parameters(), lr=args.learning_rate, **adamw)
    models = Models(teacher, *accelerator.prepare(student, optimizer, get_scheduler(args.lr_scheduler, optimizer,
                                                                                      **schedule)))
    if args.lpips_scale > 0:
        models.lpips_metric = load_lpips(args.lpips_net, args.lpips_backbone, args.lpips_heads, accelerator.device)
    if args.gen_scale > 0:
        discriminator = Discriminator(args.discriminator_channels, args.discriminator_depth)
        d_optimizer = torch.optim.AdamW(discriminator.parameters(), lr=args.discr_learning_rate, **adamw)
        models.discriminator, models.d_optimizer, models.d_scheduler = accelerator.prepare(
            discriminator, d_optimizer, get_scheduler(args.lr_scheduler, d_optimizer, **schedule))
    if args.use_ema:
        models.ema = EMAModel(vae_module(models.student).decoder.parameters(), decay=args.ema_decay)
        models.ema.to(accelerator.device)
        accelerator.register_for_checkpointing(models.ema)
    return models


def optimiser_step(models, data, problems, step, args, accelerator):
    """One generator step (even `step`, or every step without a discriminator) or discriminator step; its logs. The
    batches' unreadable and up-scaled images go to `problems` (accelerated.DataProblems)."""
    train_d = models.discriminator is not None and step % 2 == 1
    model, optimizer, scheduler = ((models.discriminator, models.d_optimizer, models.d_scheduler) if train_d
                                   else (models.student, models.optimizer, models.scheduler))
    if models.discriminator is not None:
        vae_module(models.discriminator).requires_grad_(train_d)
    student, discriminator = vae_module(models.student), vae_module(models.discriminator)
    scales = (args.lpips_scale, args.gen_scale, args.sc_scale)
    logs = {}
    for micro_step in range(args.gradient_accumulation_steps):
        batch = next(data)
        problems.note(batch)
        x = batch["pixels"].to(accelerator.device)
        generator = step_generator(args.seed, step, micro_step, accelerator.process_index, "cpu")
        with accelerator.accumulate(model):
            if train_d:
                with torch.no_grad():
                    x_hat = student(x, sample_posterior=True, generator=generator).sample.clamp(-1, 1)
                terms = discriminator_losses(models.discriminator, x, x_hat, args.gp_weight)
            else:
                x_hat, f_student = reconstruct_with_features(models.student, x, generator)
                with torch.no_grad():
                    _, f_teacher = reconstruct_with_features(models.teacher, x, generator)
                terms = generator_losses(x, x_hat, f_student, f_teacher, discriminator, models.lpips_metric,
                                         student.decoder.conv_out.weight, scales)
            accelerator.backward(terms["loss"])
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        for name, value in terms.items():
            logs[name] = logs.get(name, 0.0) + value.item() / args.gradient_accumulation_steps
    if models.ema is not None and not train_d:
        models.ema.step(student.decoder.parameters())
    logs = {("d_" if train_d else "g_") + name: value for name, value in logs.items()}
    return {**logs, "lr": scheduler.get_last_lr()[0]}


def main(args):
    """Check every flag; the launch's main process holds --output_dir while the run (`fine_tune`) lasts."""
    check_args(args)
    with outputs.FolderLock(args.output_dir, "--output_dir"):
        check_output_dir(args, Path(args.output_dir), RUN_FILES, EXTENDING_FLAGS)
        if args.check_only:  # the data too, as the run lists it first; then stop
            return checked_only(lambda: len(find_images(args.train_data_dir, f"--train_data_dir {args.train_data_dir}",
                                                        IMAGE_SUFFIXES)[0]))
        return fine_tune(args)


def fine_tune(args):
    """Train the decoder (main's checks passed); save OUTPUT_DIR/vae and train_summary.json; return the summary."""
    # Setup (one job of the launched processes, or none; precision: the flag, the authors' fp32 by default):
    output_dir = Path(args.output_dir)
    accelerator = make_accelerator(output_dir, args.gradient_accumulation_steps, args.mixed_precision, args.report_to)
    if args.overwrite_output_dir and accelerator.is_main_process and holds_run(output_dir, RUN_FILES):
        clear_run(output_dir)
    accelerator.wait_for_everyone()
    set_seed(args.seed)

    # Setup data:
    paths, found = find_images(args.train_data_dir, f"--train_data_dir {args.train_data_dir}", IMAGE_SUFFIXES)
    problems = DataProblems(found)
    dataset = TrainImages(paths, args.train_data_dir, args.resolution, args.random_flip, args.seed)
    world_batch = args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    max_steps = args.max_train_steps or args.num_train_epochs * math.ceil(len(dataset) / world_batch)
    val_images = validation_images(args, paths)

    # Create the models (only the student's decoder and the discriminator train):
    models = create_models(args, accelerator, max_steps)

    # Resume (models, optimisers, schedules, EMA from accelerate; data and posterior noise follow from the step):
    start_step = resume(accelerator, output_dir, args.resume_from_checkpoint, problems)
    sampler = StreamSampler(len(dataset), args.train_batch_size, args.seed, accelerator.process_index,
                            accelerator.num_processes, start_batch=start_step * world_batch // args.train_batch_size)
    data = iter(DataLoader(dataset, batch_size=args.train_batch_size, sampler=sampler, collate_fn=collate,
                           num_workers=args.dataloader_num_workers))
    accelerator.init_trackers("sc-vae", config={k: str(v) for k, v in vars(args).items()})
    logger.info(f"{len(dataset)} images, {world_batch} per optimiser step, steps {start_step} -> {max_steps}, "
                f"{'generator and discriminator steps alternating' if args.gen_scale > 0 else 'generator steps only'}")

    # Training loop:
    losses, started = [], time.time()
    progress = tqdm(total=max_steps, initial=start_step, desc="Steps", disable=not accelerator.is_local_main_process)
    for step in range(start_step, max_steps):
        logs = optimiser_step(models, data, problems, step, args, accelerator)
        losses.append({"step": step + 1, **{k: v for k, v in logs.items() if k != "lr"}})
        progress.update(1)
        progress.set_postfix({k: f"{v:.3g}" for k, v in logs.items() if k.endswith("loss")})
        accelerator.log(logs, step=step + 1)
        if (step + 1) % args.checkpointing_steps == 0:
            state = {"global_step": step + 1, **problems.gather(), "settings": run_settings(args)}
            save_checkpoint(accelerator, output_dir, step + 1, state, args.checkpoints_total_limit)
        if val_images is not None and (step + 1) % args.validation_steps == 0 and accelerator.is_main_process:
            with swapped_in(models.ema, vae_module(models.student).decoder):
                log_validation(accelerator, models.student, val_images, output_dir, step + 1)
    progress.close()

    # Save the student (EMA weights) as a diffusers VAE folder:
    accelerator.wait_for_everyone()
    gathered = problems.gather()
    summary = None
    if accelerator.is_main_process:
        final = vae_module(accelerator.unwrap_model(models.student))
        if models.ema is not None:
            models.ema.copy_to(final.decoder.parameters())
        final.save_pretrained(output_dir / "vae", safe_serialization=True)
        metrics = {} if val_images is None else log_validation(accelerator, final, val_images, output_dir, max_steps)
        skipped = problems.summary(gathered)
        summary = {"steps": max_steps, "resumed_from_step": start_step, "losses": losses,
                   "n_skipped": sum(skipped["skipped"].values()), "skipped_images": gathered["corrupt_images"],
                   **skipped, "train_images": len(dataset), "seconds": round(time.time() - started, 1), **metrics}
        outputs.write_json(output_dir / "train_summary.json", summary)
        logger.info(f"Saved the SC-VAE to {output_dir / 'vae'}")
    end_run(accelerator)
    return summary


class swapped_in:
    """Context: the EMA weights in the decoder, the trained ones back afterwards (nothing without EMA)."""

    def __init__(self, ema, module):
        self.ema, self.module = ema, module

    def __enter__(self):
        if self.ema is not None:
            self.ema.store(self.module.parameters())
            self.ema.copy_to(self.module.parameters())

    def __exit__(self, *exc):
        if self.ema is not None:
            self.ema.restore(self.module.parameters())


def parse_args(argv=None):
    """Flags named as in diffusers' example trainers; defaults from the authors' SC-VAE launch script."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", required=True, help="pipeline folder with vae/, or a VAE folder")
    p.add_argument("--train_data_dir", required=True, help="imagefolder (metadata.jsonl, text may be empty) or images")
    p.add_argument("--output_dir", default="outputs/sc-vae", help="checkpoints, logs, at the end OUTPUT_DIR/vae")
    p.add_argument("--vae_mode", choices=DECODE_MODES, default="partitioned",
                   help="the student's F=16 decode; 'authors' trains under the authors' one-pixel crop")
    p.add_argument("--grid", type=int, default=2, help="partitions per side (partitioned, authors)")
    p.add_argument("--resolution", type=int, default=512, help="square crops (authors: 512, SA-1B)")
    add_run_flags(p)  # seed, batch, steps, optimiser, precision, validation steps, tracker (accelerated.py)
    p.set_defaults(train_batch_size=32,  # per device; authors: 32 x 2 accumulation x 4 GPUs
                   gradient_accumulation_steps=2,
                   gradient_checkpointing=False,
                   max_train_steps=None,  # optimiser steps, generator and discriminator together; None: the epochs
                   learning_rate=1e-5,  # the decoder's; authors: 1e-5
                   mixed_precision="no",  # authors: fp32
                   num_validation_images=4)
    p.add_argument("--num_train_epochs", type=int, default=1, help="authors: 1 (used when --max_train_steps is unset)")
    p.add_argument("--discr_learning_rate", type=float, default=1e-5, help="the discriminator's (authors: 1e-5)")
    p.add_argument("--lpips_scale", type=float, default=0.1, help="authors: 0.1; 0 needs no LPIPS weights")
    p.add_argument("--gen_scale", type=float, default=0.05, help="authors: 0.05; 0: no discriminator")
    p.add_argument("--sc_scale", type=float, default=1.0, help="scale consistency (authors: 1)")
    p.add_argument("--gp_weight", type=float, default=10.0, help="gradient penalty on real images (authors: 10)")
    add_lpips_flags(p, "vgg")  # authors: vgg
    p.add_argument("--discriminator_channels", type=int, default=512)
    p.add_argument("--discriminator_depth", type=int, default=6)
    p.add_argument("--use_ema", action="store_true", help="keep an EMA of the decoder; it is what is saved")
    p.add_argument("--ema_decay", type=float, default=0.9999)
    add_checkpoint_flags(p)  # --checkpointing_steps, --resume_from_checkpoint, ... (checkpoints.py)
    p.set_defaults(checkpointing_steps=10000)  # authors: 10,000
    p.add_argument("--validation_data_dir", default=None, help="images to reconstruct (default: the first train ones)")
    return p.parse_args(argv)


if __name__ == "__main__":
    exit_on_usage_error("train_sc_vae.py", main, parse_args())
