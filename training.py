"""Shared core of train_sd3.py and train_flux.py: WLF fine-tuning of a diffusers transformer at 4K (SPEC §3-4).

The two scripts pass in only what is model-specific (how prompts become embeddings, how the transformer is
called); everything else lives here: data, the text-embedding and latent caches, timestep sampling, the
loss, the optimiser, checkpoints, validation images, logging and the command-line flags they share.
"""
import argparse
import csv
import hashlib
import json
import logging
import os
import shutil
import time
import warnings
from functools import partial
from pathlib import Path

import diffusers
import numpy as np
import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, ProjectConfiguration, gather_object, set_seed
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.optimization import get_scheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3, free_memory
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from imagefolder import load_image, read_metadata
from partitioned_vae import check_size, load_f16_vae, use_f16_vae
from wavelet import WaveletLoss, parse_band_weights

logger = get_logger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
ENCODE_BATCH_SIZE = 8  # captions per text-encoder call while filling the cache
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)  # what a bad image file raises
MAX_LISTED = 50  # problems listed by name in train_summary.json (all are counted)


class TrainingError(RuntimeError):
    """A problem the user can fix (a flag, a file, the disk); the scripts print it without a traceback."""


#################################################################################
#                                     Data                                      #
#################################################################################

def preprocess(image, resolution, center_crop=False, flip=False, rng=None):
    """SPEC §4: shorter side to `resolution` (bilinear), random or centre crop to a square, optional h-flip, [-1, 1].

    Returns a (3, resolution, resolution) float tensor.
    """
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    image = image.resize(size, Image.Resampling.BILINEAR)
    if center_crop:
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    else:
        left, top = int(rng.integers(size[0] - resolution + 1)), int(rng.integers(size[1] - resolution + 1))
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)
    return pixels / 127.5 - 1.0


class TrainDataset(Dataset):
    """Pixels (or cached latent distributions) plus cached text embeddings, each read from disk when asked for.

    Indexed by (epoch, index) keys (StreamSampler), so that crops and flips depend only on the seed, the epoch and
    the index: the same on resume and with any number of data-loader workers. An image that cannot be decoded is
    replaced by the next one; the sample lists it under "unreadable", and images smaller than the resolution
    (up-scaled) under "upscaled", so the training loop can count them.
    """

    def __init__(self, records, data_dir, embedding_files, resolution, center_crop, random_flip, seed,
                 latent_files=None):
        self.records, self.data_dir, self.embedding_files = records, Path(data_dir), embedding_files
        self.resolution, self.center_crop, self.random_flip, self.seed = resolution, center_crop, random_flip, seed
        self.latent_files = latent_files

    def __len__(self):
        return len(self.records)

    def __getitem__(self, key):
        epoch, index = key
        rng = np.random.default_rng([self.seed, epoch, index])
        flip = self.random_flip and rng.random() < 0.5
        unreadable = []
        for attempt in range(len(self.records)):
            record = self.records[(index + attempt) % len(self.records)]
            try:
                sample = self.read_latents(record, flip) if self.latent_files else self.read_pixels(record, flip, rng)
            except IMAGE_ERRORS as error:
                unreadable.append(f"{record['file_name']}: {error}")
                continue
            sample.update(load_file(self.embedding_files[record["text"]]))
            sample["unreadable"] = unreadable
            return sample
        raise TrainingError(f"None of the {len(self.records)} images in {self.data_dir} can be read: "
                            f"{'; '.join(unreadable[:3])} ...")

    def read_pixels(self, record, flip, rng):
        """The pre-processed image of `record`."""
        image = load_image(self.data_dir / record["file_name"])
        upscaled = [record["file_name"]] if min(image.size) < self.resolution else []
        return {"pixels": preprocess(image, self.resolution, self.center_crop, flip, rng), "upscaled": upscaled}

    def read_latents(self, record, flip):
        """The cached latent distribution of `record`'s centre crop (or of its mirror image)."""
        with safe_open(self.latent_files[record["file_name"]], "pt") as cached:
            params = cached.get_tensor("latent_dist_flipped" if flip else "latent_dist")
            upscaled = [record["file_name"]] if cached.metadata().get("upscaled") == "1" else []
        return {"latent_dist": params, "upscaled": upscaled}


def collate(samples):
    """Stack the tensors of a list of samples; concatenate their problem lists."""
    batch = {key: torch.stack([s[key] for s in samples]) for key, value in samples[0].items() if torch.is_tensor(value)}
    for key in ("unreadable", "upscaled"):
        batch[key] = [item for s in samples for item in s[key]]
    return batch


class StreamSampler(Sampler):
    """Endless (epoch, index) keys: one seeded permutation per epoch, cut into batches dealt round-robin to the
    processes, starting at global batch `start_batch` (so a resumed run sees exactly the data it would have)."""

    def __init__(self, size, batch_size, seed, rank=0, world_size=1, start_batch=0):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size, self.start_batch = rank, world_size, start_batch
        self._epoch, self._order = None, None

    def key(self, position):
        """(epoch, dataset index) of the position-th sample of the global stream."""
        epoch, offset = divmod(position, self.size)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.size)
        return epoch, int(self._order[offset])

    def __iter__(self):
        batch = self.start_batch + self.rank
        while True:
            for position in range(batch * self.batch_size, (batch + 1) * self.batch_size):
                yield self.key(position)
            batch += self.world_size


#################################################################################
#                       Text-embedding and latent caches                        #
#################################################################################

def hash_files(root, patterns, digest=None):
    """sha256 over the relative names and bytes of the files under `root` matching `patterns` (glob)."""
    digest = digest or hashlib.sha256()
    for path in sorted({p for pattern in patterns for p in Path(root).glob(pattern) if p.is_file()}):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest


def text_encoder_identity(model_dir):
    """Identity of a pipeline's text encoders: its path and the configs / vocabularies of its encoders and
    tokenizers (never the weights, so the key can be computed without the encoders being there)."""
    root = Path(model_dir).resolve()
    digest = hashlib.sha256(str(root).encode())
    return hash_files(root, ["text_encoder*/*.json", "tokenizer*/*"], digest).hexdigest()


def vae_identity(model_dir):
    """Identity of a pipeline's VAE: its path and config."""
    root = Path(model_dir).resolve()
    return hash_files(root, ["vae/config.json"], hashlib.sha256(str(root).encode())).hexdigest()


def cache_key(*parts):
    """sha256 hex digest of a JSON list of `parts`."""
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()


def embedding_files(captions, cache_dir, identity, max_sequence_length, dtype):
    """{caption: cache file}; the key covers the caption, the text encoders, the sequence length and the dtype."""
    folder = Path(cache_dir) / "embeddings"
    return {c: folder / f"{cache_key(c, identity, max_sequence_length, dtype)}.safetensors" for c in captions}


def latent_files(records, data_dir, cache_dir, identity, resolution, dtype):
    """{file_name: cache file}; the key covers the image file (path, size, mtime), the VAE, resolution and dtype."""
    files = {}
    for record in records:
        path = (Path(data_dir) / record["file_name"]).resolve()
        stat = path.stat()
        key = cache_key(path, stat.st_size, stat.st_mtime_ns, identity, resolution, dtype)
        files[record["file_name"]] = Path(cache_dir) / "latents" / f"{key}.safetensors"
    return files


def save_atomically(tensors, path, metadata=None):
    """save_file to a temporary name, then rename: a crash never leaves a half-written cache file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        save_file({k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_text_encoders(pipeline_class, model_dir, dtype, device):
    """The pipeline with only its tokenizers and text encoders (no transformer, no VAE), on `device`."""
    return pipeline_class.from_pretrained(model_dir, transformer=None, vae=None, torch_dtype=dtype).to(device)


def cache_embeddings(files, load_text_encoders, encode_prompts, max_sequence_length, batch_size=ENCODE_BATCH_SIZE):
    """Embed every caption of `files` whose cache file is missing, one safetensors file per caption.

    The text encoders are loaded (`load_text_encoders()`) only when a caption is missing, and freed afterwards;
    embeddings are written batch by batch, so host memory stays flat in the number of captions.
    Returns the number of captions embedded (0: the encoders were not loaded).
    """
    missing = [caption for caption, path in files.items() if not path.is_file()]
    if not missing:
        return 0
    pipe = load_text_encoders()
    for start in range(0, len(missing), batch_size):
        chunk = missing[start:start + batch_size]
        with torch.no_grad():
            embeddings = encode_prompts(pipe, chunk, max_sequence_length)
        for i, caption in enumerate(chunk):
            save_atomically({name: tensor[i] for name, tensor in embeddings.items()}, files[caption])
    del pipe, embeddings
    free_memory()
    return len(missing)


def cache_latents(vae, records, data_dir, files, resolution):
    """Encode the centre crop of every image not cached yet, and its mirror image, with the F=16 VAE; save both
    latent distributions (mean and log-variance) in one file. Returns the unreadable images' problems."""
    unreadable = []
    for record in records:
        path = files[record["file_name"]]
        if path.is_file():
            continue
        try:
            image = load_image(Path(data_dir) / record["file_name"])
        except IMAGE_ERRORS as error:
            unreadable.append(f"{record['file_name']}: {error}")
            continue
        pixels = preprocess(image, resolution, center_crop=True)
        pixels = torch.stack([pixels, pixels.flip(-1)]).to(vae.device, vae.dtype)
        with torch.no_grad():
            params = vae.encode(pixels).latent_dist.parameters
        upscaled = "1" if min(image.size) < resolution else "0"
        save_atomically({"latent_dist": params[0], "latent_dist_flipped": params[1]}, path, {"upscaled": upscaled})
    return unreadable


#################################################################################
#                        Noise, timesteps and the loss                          #
#################################################################################

def step_generator(seed, step, micro_step, rank, device):
    """A torch.Generator for one micro-batch, seeded from (seed, step, micro-step, process): resumable exactly."""
    state = np.random.SeedSequence([seed, step, micro_step, rank]).generate_state(2, np.uint64)[0]
    return torch.Generator(device).manual_seed(int(state) & (2**63 - 1))


def weighted_mse(pred, target, weighting):
    """Plain flow-matching loss: mean of w_t * (pred - target)^2."""
    return (weighting * (pred - target) ** 2).mean()


def build_loss(args):
    """The training objective: WLF (SPEC §3.2, wavelet.WaveletLoss) or plain MSE."""
    if args.loss == "wlf":
        return WaveletLoss(args.wavelet_levels, args.wavelet_band_weights)
    return weighted_mse


def training_loss(transformer, predict, batch, vae, scheduler, loss_fn, args, generator, model_dtype):
    """The loss of one micro-batch: latents, noise at timesteps from `args.weighting_scheme`, prediction, target.

    z_t = (1 - sigma) x0 + sigma eps. Preconditioned (the authors' code): x0_hat = output * (-sigma) + z_t against
    x0; otherwise the velocity eps - x0 (paper eq. 3). Weighted per sample by compute_loss_weighting_for_sd3.
    """
    if "latent_dist" in batch:
        latents = DiagonalGaussianDistribution(batch["latent_dist"].float()).sample(generator)
    else:
        with torch.no_grad():
            latents = vae.encode(batch["pixels"].to(vae.dtype)).latent_dist.sample(generator).float()
    latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=generator, device=latents.device)
    u = compute_density_for_timestep_sampling(args.weighting_scheme, latents.shape[0], args.logit_mean,
                                              args.logit_std, args.mode_scale, latents.device, generator)
    indices = (u * scheduler.config.num_train_timesteps).long().cpu()
    timesteps = scheduler.timesteps[indices].to(latents.device)
    sigmas = scheduler.sigmas[indices].to(latents.device).view(-1, 1, 1, 1)
    noisy = (1.0 - sigmas) * latents + sigmas * noise
    embeddings = {name: batch[name].to(model_dtype) for name in batch if name.endswith("prompt_embeds")}
    output = predict(transformer, noisy.to(model_dtype), timesteps, embeddings).float()
    if args.precondition_outputs:
        pred, target = output * (-sigmas) + noisy, latents
    else:
        pred, target = output, noise - latents
    return loss_fn(pred, target, compute_loss_weighting_for_sd3(args.weighting_scheme, sigmas))


#################################################################################
#                  Optimiser, checkpoints, validation, output                   #
#################################################################################

def deepspeed_offloads_optimizer(accelerator):
    """Whether DeepSpeed runs this job with the optimizer states offloaded to CPU (or NVMe)."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return False
    zero = accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
    return zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)


def build_optimizer(params, args, accelerator):
    """AdamW with the paper's settings (SPEC §4).

    With DeepSpeed offloading the optimizer, its CPU AdamW (DeepSpeedCPUAdam, fp32 states in host memory) is the
    only choice: we build it ourselves so that betas and eps are ours too (accelerate's automatic swap keeps only
    lr and weight decay), and --use_8bit_adam is ignored. Otherwise --use_8bit_adam takes bitsandbytes' AdamW8bit.
    """
    settings = dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                    weight_decay=args.adam_weight_decay)
    if deepspeed_offloads_optimizer(accelerator):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        if args.use_8bit_adam:
            logger.warning("--use_8bit_adam is ignored: DeepSpeed offloads the optimizer to the CPU, where it runs "
                           "its own AdamW (DeepSpeedCPUAdam). For 8-bit Adam drop offload_optimizer_device from the "
                           "accelerate config.")
        accelerator.state.deepspeed_plugin.deepspeed_config["zero_force_ds_cpu_optimizer"] = False
        return DeepSpeedCPUAdam(params, adamw_mode=True, **settings)
    if args.use_8bit_adam:
        try:
            import bitsandbytes
        except ImportError as error:
            raise TrainingError("--use_8bit_adam needs bitsandbytes (`pip install bitsandbytes`, CUDA GPUs only); "
                                "install it or drop the flag to use torch's AdamW.") from error
        return bitsandbytes.optim.AdamW8bit(params, **settings)
    return torch.optim.AdamW(params, **settings)


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
    if not (path / "trainer_state.json").is_file():
        raise TrainingError(f"--resume_from_checkpoint {resume_from_checkpoint}: {path} is not a checkpoint folder "
                            f"written by this trainer (no trainer_state.json). Use 'latest' or a {CHECKPOINT_PREFIX}N "
                            f"folder of {output_dir}.")
    return path


def save_checkpoint(accelerator, output_dir, step, trainer_state, total_limit=None):
    """accelerator.save_state into checkpoint-N.tmp, then rename it to checkpoint-N, then prune the oldest.

    A failed write (a full disk) removes the .tmp folder and raises TrainingError; older checkpoints are untouched.
    """
    final = Path(output_dir) / f"{CHECKPOINT_PREFIX}{step}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    problem = None
    try:
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            (tmp / "trainer_state.json").write_text(json.dumps(trainer_state))
    except Exception as error:  # any failed write: disk full, quota, I/O error
        problem = f"{type(error).__name__}: {error}"
    problems = [p for p in gather_object([problem]) if p]
    if problems:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = list_checkpoints(output_dir)
        kept = f"the previous checkpoint {previous[-1][1]} is intact" if previous else "no earlier checkpoint exists"
        raise TrainingError(f"Could not write checkpoint {final} ({problems[0]}); {kept}. Free disk space in "
                            f"{output_dir}, then resume with --resume_from_checkpoint latest.")
    if accelerator.is_main_process:
        old = final.with_name(final.name + ".old")
        if final.exists():  # a re-run after resuming from an earlier step
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        for _, path in list_checkpoints(output_dir)[:-total_limit] if total_limit else []:
            shutil.rmtree(path)
            logger.info(f"Removed {path} (--checkpoints_total_limit {total_limit})")
    accelerator.wait_for_everyone()
    logger.info(f"Saved {final}")
    return final


def link_or_copy(src, dst):
    """Hard-link src to dst (the frozen multi-GB components then cost no disk), copying across file systems."""
    if os.path.lexists(dst):
        os.remove(dst)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def save_pipeline(accelerator, transformer, pretrained_dir, output_dir):
    """Make output_dir a complete diffusers pipeline: the fine-tuned transformer plus the original components."""
    state_dict = accelerator.get_state_dict(transformer)
    if not accelerator.is_main_process:
        return
    source, output_dir = Path(pretrained_dir), Path(output_dir)
    index = json.loads((source / "model_index.json").read_text())
    for name, entry in index.items():
        if name.startswith("_") or name == "transformer" or not isinstance(entry, list) or None in entry:
            continue
        shutil.copytree(source / name, output_dir / name, copy_function=link_or_copy, dirs_exist_ok=True)
    shutil.rmtree(output_dir / "transformer", ignore_errors=True)
    accelerator.unwrap_model(transformer).save_pretrained(output_dir / "transformer", state_dict=state_dict,
                                                          safe_serialization=True)
    shutil.copy2(source / "model_index.json", output_dir / "model_index.json")  # last: marks the pipeline complete


def text_encoder_names(pretrained_dir):
    """The pipeline's text-encoder component names (text_encoder, text_encoder_2, ...)."""
    index = json.loads((Path(pretrained_dir) / "model_index.json").read_text())
    return [name for name in index if name.startswith("text_encoder")]


def log_validation(accelerator, args, pipeline_class, transformer, vae, validation_inputs, step):
    """Generate --num_validation_images with the stock pipeline (cached prompt embeddings, F=16 VAE); save PNGs."""
    model, model_dir = accelerator.unwrap_model(transformer), args.pretrained_model_name_or_path
    no_text_encoders = {name: None for name in text_encoder_names(model_dir)}
    pipe = pipeline_class.from_pretrained(model_dir, transformer=model, vae=vae, **no_text_encoders)
    use_f16_vae(pipe)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(args.seed)
    model.eval()
    # Under mixed precision the trained weights may be fp32 and the VAE bf16: autocast lets the two meet.
    with torch.autocast(vae.device.type, dtype=vae.dtype, enabled=vae.dtype != torch.float32):
        images = [pipe(height=args.resolution, width=args.resolution, generator=generator,
                       **validation_inputs).images[0] for _ in range(args.num_validation_images)]
    model.train()
    folder = Path(args.output_dir) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image.save(folder / f"step-{step:06d}-{i}.png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            pixels = np.stack([np.asarray(image) for image in images])
            tracker.writer.add_images("validation", pixels, step, dataformats="NHWC")
    del pipe
    free_memory()
    return images


#################################################################################
#                                 Training loop                                 #
#################################################################################

def check_args(args):
    """Fail at start, with the flag to fix, on settings that would otherwise fail hours in."""
    try:
        check_size(args.resolution, args.resolution)
    except ValueError as error:
        raise TrainingError(f"--resolution: {error}") from error
    if not Path(args.pretrained_model_name_or_path, "model_index.json").is_file():
        raise TrainingError(f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path} is not a local "
                            f"diffusers pipeline folder (no model_index.json). Download the pipeline first, e.g. into "
                            f"./pretrain/.")
    for flag in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "checkpointing_steps"):
        if getattr(args, flag) < 1:
            raise TrainingError(f"--{flag} must be at least 1, got {getattr(args, flag)}.")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise TrainingError("--checkpoints_total_limit must be at least 1 (or left out to keep every checkpoint).")


def check_positional_embedding(config, resolution):
    """SD3's positional embedding covers pos_embed_max_size patches a side: refuse larger training images."""
    max_patches = config.get("pos_embed_max_size")
    max_pixels = max_patches * config["patch_size"] * 16 if max_patches else None
    if max_pixels and resolution > max_pixels:
        raise TrainingError(f"--resolution {resolution} is too large for this transformer: its positional embedding "
                            f"covers {max_patches} patches a side, i.e. {max_pixels} pixels with the F=16 VAE.")


def describe_engine(accelerator, optimizer):
    """What actually runs: distributed type, processes, precision, the innermost optimizer class, ZeRO settings."""
    inner = optimizer
    while hasattr(inner, "optimizer"):  # accelerate / DeepSpeed wrappers
        inner = inner.optimizer
    engine = {"distributed_type": str(accelerator.distributed_type.value), "processes": accelerator.num_processes,
              "mixed_precision": accelerator.mixed_precision, "optimizer": type(inner).__name__}
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        zero = accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"]
        offload = zero.get("offload_optimizer", {}).get("device", "none")
        engine.update(zero_stage=zero["stage"], offload_optimizer=offload)
    return engine


def gather_union(items):
    """The sorted union of `items` over all processes."""
    return sorted(set().union(*gather_object([sorted(items)])))


def note_new(seen, items, what):
    """Add the items not seen before to `seen`, with a warning for each (every image is reported once)."""
    for item in sorted(set(items) - seen):
        seen.add(item)
        logger.warning(f"{what}: {item}", main_process_only=False)


def warn_problems(what, problems):
    """Log a count and the first few examples of one kind of skipped input."""
    if problems:
        more = " ..." if len(problems) > 5 else ""
        logger.warning(f"{len(problems)} {what} skipped: " + "; ".join(problems[:5]) + more)


def write_summary(args, path, status, start_step, global_step, problems, caches, elapsed, images_per_step):
    """train_summary.json: status, steps, losses, skipped and up-scaled inputs, caches, speed, settings."""
    losses = read_losses(Path(args.output_dir) / "losses.csv")
    trained = global_step - start_step
    summary = {
        "status": status, "steps": global_step, "resumed_from_step": start_step,
        "max_train_steps": args.max_train_steps,
        "final_loss": losses[-1] if losses else None, "losses": losses,
        "skipped": {kind: len(items) for kind, items in problems.items() if kind != "upscaled_images"},
        "upscaled_images": len(problems["upscaled_images"]),
        "problems": {kind: items[:MAX_LISTED] for kind, items in problems.items()},
        **caches, "seconds": round(elapsed, 3),
        "images_per_second": round(trained * images_per_step / elapsed, 4) if elapsed > 0 and trained else None,
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
    }
    Path(path).write_text(json.dumps(summary, indent=2))
    return summary


def read_losses(path):
    """The per-step losses of losses.csv, in step order."""
    if not Path(path).is_file():
        return []
    with open(path, newline="") as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


def open_loss_log(path, keep_until_step):
    """losses.csv (step, loss, lr) opened for appending, with the rows after `keep_until_step` dropped."""
    rows = []
    if keep_until_step and Path(path).is_file():
        with open(path, newline="") as f:
            rows = [row for row in csv.DictReader(f) if int(row["step"]) <= keep_until_step]
    log = open(path, "w", newline="", buffering=1)
    writer = csv.DictWriter(log, fieldnames=["step", "loss", "lr"])
    writer.writeheader()
    writer.writerows(rows)
    return log, writer


def train(args, pipeline_class, transformer_class, encode_prompts, predict, validation_kwargs):
    """Fine-tune `transformer_class` of the pipeline at args.pretrained_model_name_or_path; see the module docstring.

    encode_prompts(pipe, prompts, max_sequence_length) -> {name ending in "prompt_embeds": (B, ...) tensor}
    predict(transformer, noisy_latents (B, 16, h, w), timesteps (B,), embeddings) -> output (B, 16, h, w), the
        transformer's raw prediction in the latent layout (Flux: unpacked)
    validation_kwargs(embeddings, negative_embeddings) -> extra keyword arguments of the pipeline call
    """
    check_args(args)
    model_dir, output_dir = args.pretrained_model_name_or_path, Path(args.output_dir)
    check_positional_embedding(transformer_class.load_config(model_dir, subfolder="transformer"), args.resolution)
    output_dir.mkdir(parents=True, exist_ok=True)
    # Setup accelerate (DeepSpeed comes from `accelerate launch --config_file ds_config.yaml`):
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "bf16"),
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    for library in (transformers, diffusers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()
    # Recent diffusers renamed `torch_dtype` to `dtype`; the older ones requirements.txt allows know only `torch_dtype`.
    warnings.filterwarnings("ignore", message=".*`dtype` instead.*", category=FutureWarning)
    is_deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if is_deepspeed:
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        ds_config["train_micro_batch_size_per_gpu"] = args.train_batch_size  # no dataloader goes through prepare()
        ds_config["gradient_clipping"] = args.max_grad_norm
    set_seed(args.seed)
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32)
    device = accelerator.device

    # Setup data (every metadata line is checked now; images are decoded lazily):
    try:
        records, problems = read_metadata(args.instance_data_dir)
    except FileNotFoundError as error:
        raise TrainingError(f"--instance_data_dir: {error}") from None
    warn_problems("metadata lines", problems["metadata_lines"])
    warn_problems("missing images", problems["missing_images"])
    if not records:
        raise TrainingError(f"No usable image in {args.instance_data_dir}/metadata.jsonl: "
                            f"{len(problems['metadata_lines'])} bad lines, {len(problems['missing_images'])} missing "
                            f"images ({'; '.join((problems['metadata_lines'] + problems['missing_images'])[:3])}).")
    problems.update(corrupt_images=[], upscaled_images=[])
    cache_dir = Path(args.data_cache_dir or output_dir / "cache")

    # Cache text embeddings; the text encoders are loaded only for captions not cached yet (main process per node):
    validation_prompts = [args.validation_prompt, ""] if args.validation_prompt else []
    captions = list(dict.fromkeys([r["text"] for r in records] + validation_prompts))
    identity = text_encoder_identity(model_dir)
    files = embedding_files(captions, cache_dir, identity, args.max_sequence_length, weight_dtype)
    missing = sum(not path.is_file() for path in files.values())
    logger.info(f"{missing} of {len(files)} captions are not in the embedding cache {cache_dir / 'embeddings'}: "
                + ("loading the text encoders to embed them" if missing else "the text encoders are not loaded"))
    embedded = 0
    if accelerator.is_local_main_process:
        loader = partial(load_text_encoders, pipeline_class, model_dir, weight_dtype, device)
        embedded = cache_embeddings(files, loader, encode_prompts, args.max_sequence_length)
    accelerator.wait_for_everyone()
    embedded = sum(gather_object([embedded]))

    # Frozen F=16 VAE; optionally cache latents (centre crop and its mirror image), split over the processes:
    vae = load_f16_vae(model_dir, subfolder="vae", torch_dtype=weight_dtype).to(device).requires_grad_(False)
    latents = None
    if args.cache_latents:
        latents = latent_files(records, args.instance_data_dir, cache_dir, vae_identity(model_dir), args.resolution,
                               weight_dtype)
        mine = records[accelerator.process_index::accelerator.num_processes]
        unreadable = cache_latents(vae, mine, args.instance_data_dir, latents, args.resolution)
        problems["corrupt_images"] = gather_union(unreadable)
        bad = {problem.split(": ", 1)[0] for problem in problems["corrupt_images"]}
        records = [r for r in records if r["file_name"] not in bad]
        warn_problems("unreadable images", problems["corrupt_images"])
        if not records:
            raise TrainingError(f"None of the images in {args.instance_data_dir} can be read.")
        if not args.validation_prompt:
            vae.to("cpu")  # off the accelerator: only its config (latent scale and shift) is still needed
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(model_dir, subfolder="scheduler")
    dataset = TrainDataset(records, args.instance_data_dir, files, args.resolution,
                           args.center_crop or args.cache_latents, args.random_flip, args.seed, latents)

    # Create the model, optimiser and learning-rate schedule:
    # DeepSpeed keeps fp32 master weights in its (offloaded) optimizer and runs the module in its precision: load it
    # in that precision (half the host memory per process). Plain accelerate trains fp32 weights under autocast.
    transformer = transformer_class.from_pretrained(model_dir, subfolder="transformer",
                                                    torch_dtype=weight_dtype if is_deepspeed else torch.float32)
    transformer.requires_grad_(True).train()
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    optimizer = build_optimizer(transformer.parameters(), args, accelerator)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer,  # stepped once per process, as in diffusers' examples
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes)
    transformer, optimizer, lr_scheduler = accelerator.prepare(transformer, optimizer, lr_scheduler)
    model_dtype = accelerator.unwrap_model(transformer).dtype
    loss_fn = build_loss(args)

    # Resume (model, optimiser, schedule from accelerate; the data stream and noise follow from the step):
    start_step = 0
    for unfinished in output_dir.glob(f"{CHECKPOINT_PREFIX}*.tmp") if accelerator.is_main_process else []:
        shutil.rmtree(unfinished)
        logger.warning(f"Removed {unfinished}: a checkpoint whose writing was interrupted")
    if args.resume_from_checkpoint:
        checkpoint = find_checkpoint(output_dir, args.resume_from_checkpoint)
        if checkpoint is None:
            logger.info(f"No checkpoint in {output_dir}: starting a new run")
        else:
            accelerator.load_state(str(checkpoint))
            state = json.loads((checkpoint / "trainer_state.json").read_text())
            start_step = state["global_step"]
            problems["corrupt_images"] = sorted(set(problems["corrupt_images"]) | set(state["corrupt_images"]))
            problems["upscaled_images"] = state["upscaled_images"]
            logger.info(f"Resumed from {checkpoint} at step {start_step}")
    world_batches = args.gradient_accumulation_steps * accelerator.num_processes
    sampler = StreamSampler(len(dataset), args.train_batch_size, args.seed, accelerator.process_index,
                            accelerator.num_processes, start_batch=start_step * world_batches)
    dataloader = DataLoader(dataset, batch_size=args.train_batch_size, sampler=sampler, collate_fn=collate,
                            num_workers=args.dataloader_num_workers, pin_memory=device.type == "cuda")

    validation_inputs = None
    if args.validation_prompt:
        positive, negative = (load_file(files[p], device=str(device)) for p in validation_prompts)
        validation_inputs = validation_kwargs({k: v[None].to(weight_dtype) for k, v in positive.items()},
                                              {k: v[None].to(weight_dtype) for k, v in negative.items()})
    accelerator.init_trackers("diffusion-4k", config={k: str(v) for k, v in vars(args).items()})
    if accelerator.is_main_process:
        loss_log, loss_writer = open_loss_log(output_dir / "losses.csv", start_step)
    images_per_step = args.train_batch_size * world_batches
    caches = {"text_encoders_loaded": embedded > 0, "captions_embedded": embedded, "captions": len(captions),
              "train_images": len(records), "latents_cached": bool(args.cache_latents),
              "engine": describe_engine(accelerator, optimizer)}
    logger.info(f"{len(records)} images, {images_per_step} images per step ({args.train_batch_size} per device x "
                f"{accelerator.num_processes} processes x {args.gradient_accumulation_steps} accumulation), "
                f"steps {start_step} -> {args.max_train_steps}, loss {args.loss}")

    # Training loop:
    global_step, micro_step, step_losses, started = start_step, 0, [], time.time()
    unreadable, upscaled = set(problems["corrupt_images"]), set(problems["upscaled_images"])

    def summarize(status):
        """Gather the problem counters of every process; write train_summary.json (main process)."""
        problems["corrupt_images"], problems["upscaled_images"] = gather_union(unreadable), gather_union(upscaled)
        if accelerator.is_main_process:
            loss_log.flush()
            summary = write_summary(args, output_dir / "train_summary.json", status, start_step, global_step, problems,
                                    caches, time.time() - started, images_per_step)
            logger.info(f"{status.split(':')[0]} at step {global_step}; skipped {summary['skipped']}, "
                        f"up-scaled {summary['upscaled_images']}; see {output_dir / 'train_summary.json'}")
            return summary

    progress = tqdm(total=args.max_train_steps, initial=start_step, desc="Steps",
                    disable=not accelerator.is_local_main_process)
    data = iter(dataloader)
    try:
        while global_step < args.max_train_steps:
            batch = next(data)
            note_new(unreadable, batch["unreadable"], "unreadable image skipped")
            note_new(upscaled, batch["upscaled"], "image smaller than --resolution, up-scaled")
            batch = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}
            with accelerator.accumulate(transformer):
                generator = step_generator(args.seed, global_step, micro_step, accelerator.process_index, device)
                loss = training_loss(transformer, predict, batch, vae, scheduler, loss_fn, args, generator, model_dtype)
                if not torch.isfinite(accelerator.gather(loss.detach())).all():  # every process stops here together
                    raise TrainingError(
                        f"The loss is not finite ({loss.item()}) at step {global_step + 1}: training stopped before "
                        f"updating the weights; the last checkpoint in {output_dir} is intact. Lower --learning_rate "
                        f"or check the data, then resume with --resume_from_checkpoint latest.")
                accelerator.backward(loss)
                if accelerator.sync_gradients and not is_deepspeed:
                    accelerator.clip_grad_norm_(transformer.parameters(), args.max_grad_norm)  # DeepSpeed clips itself
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            step_losses.append(loss.detach())
            micro_step += 1
            if not accelerator.sync_gradients:
                continue
            global_step, micro_step = global_step + 1, 0
            step_loss = accelerator.gather(torch.stack(step_losses).mean()).mean().item()
            step_losses = []
            lr = lr_scheduler.get_last_lr()[0]
            progress.update(1)
            progress.set_postfix(loss=f"{step_loss:.4g}", lr=f"{lr:.2g}")
            accelerator.log({"loss": step_loss, "lr": lr}, step=global_step)
            if accelerator.is_main_process:
                loss_writer.writerow({"step": global_step, "loss": repr(step_loss), "lr": lr})
            if global_step % args.checkpointing_steps == 0:
                state = {"global_step": global_step, "corrupt_images": gather_union(unreadable),
                         "upscaled_images": gather_union(upscaled)}
                save_checkpoint(accelerator, output_dir, global_step, state, args.checkpoints_total_limit)
            if validation_inputs and global_step % args.validation_steps == 0 and accelerator.is_main_process:
                log_validation(accelerator, args, pipeline_class, transformer, vae, validation_inputs, global_step)
    except TrainingError as error:  # raised on every process at the same step (non-finite loss, failed checkpoint)
        progress.close()
        summarize(f"stopped: {error}")
        if accelerator.is_main_process:
            loss_log.close()
        raise
    progress.close()
    summary = summarize("completed")

    # Save the fine-tuned pipeline (the fine-tuned transformer + the original components):
    accelerator.wait_for_everyone()
    save_pipeline(accelerator, transformer, model_dir, output_dir)
    if validation_inputs and accelerator.is_main_process and args.max_train_steps % args.validation_steps:
        log_validation(accelerator, args, pipeline_class, transformer, vae, validation_inputs, global_step)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if accelerator.is_main_process:
        loss_log.close()
    logger.info(f"Saved the fine-tuned pipeline to {output_dir}")
    return summary if accelerator.is_main_process else None


def run(main, args):
    """Call main(args); print a TrainingError as a plain message and exit with status 1."""
    try:
        main(args)
    except TrainingError as error:
        raise SystemExit(f"error: {error}") from None


#################################################################################
#                        Command-line flags of both trainers                    #
#################################################################################

def build_parser(description, max_sequence_length):
    """The flags both trainers share, with diffusers' example names and the paper's defaults (SPEC §4)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", required=True, help="local diffusers pipeline folder")
    p.add_argument("--instance_data_dir", required=True, help="imagefolder with metadata.jsonl (file_name, text)")
    p.add_argument("--output_dir", default="outputs/wlf", help="checkpoints, logs, at the end the fine-tuned pipeline")
    p.add_argument("--data_cache_dir", default=None, help="text-embedding / latent cache (default: OUTPUT_DIR/cache)")
    p.add_argument("--seed", type=int, default=0, help="seeds data order, crops, noise and timesteps")
    p.add_argument("--resolution", type=int, default=4096, help="square training size, a multiple of 32 (paper: 4096)")
    p.add_argument("--center_crop", action="store_true", help="centre crop instead of a random crop")
    p.add_argument("--random_flip", action=argparse.BooleanOptionalAction, default=True,
                   help="random horizontal flip (the authors' code always flips)")
    p.add_argument("--cache_latents", action="store_true",
                   help="encode each image once (centre crop and its mirror) and cache the latent distributions")
    p.add_argument("--dataloader_num_workers", type=int, default=0)
    p.add_argument("--max_sequence_length", type=int, default=max_sequence_length, help="T5 tokens per caption")
    p.add_argument("--train_batch_size", type=int, default=8, help="per device (paper: SD3 8, Flux 4)")
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations (paper: on)")
    p.add_argument("--max_train_steps", type=int, default=20000, help="paper: 20,000")
    p.add_argument("--learning_rate", type=float, default=1e-6, help="paper: 1e-6")
    p.add_argument("--lr_scheduler", default="constant", help="a diffusers.optimization schedule (paper: constant)")
    p.add_argument("--lr_warmup_steps", type=int, default=0)
    p.add_argument("--use_8bit_adam", action="store_true",
                   help="bitsandbytes AdamW8bit; ignored when DeepSpeed offloads the optimizer (ds_config.yaml)")
    p.add_argument("--adam_beta1", type=float, default=0.9)
    p.add_argument("--adam_beta2", type=float, default=0.999)
    p.add_argument("--adam_weight_decay", type=float, default=1e-4)
    p.add_argument("--adam_epsilon", type=float, default=1e-8)
    p.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient-norm clip (also DeepSpeed's)")
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                   help="default: what `accelerate launch` says (ds_config.yaml: bf16), else bf16")
    p.add_argument("--weighting_scheme", default="logit_normal",
                   choices=["sigma_sqrt", "logit_normal", "mode", "cosmap", "none"],
                   help="timestep density and loss weight (diffusers.training_utils)")
    p.add_argument("--logit_mean", type=float, default=0.0)
    p.add_argument("--logit_std", type=float, default=1.0)
    p.add_argument("--mode_scale", type=float, default=1.29)
    p.add_argument("--precondition_outputs", action=argparse.BooleanOptionalAction, default=True,
                   help="the authors' x0 target (output * -sigma + z_t vs x0); "
                        "--no-precondition_outputs: velocity eps - x0")
    p.add_argument("--loss", choices=["wlf", "mse"], default="wlf", help="wavelet loss (SPEC §3.2) or plain MSE")
    p.add_argument("--wavelet_levels", type=int, default=1)
    p.add_argument("--wavelet_band_weights", type=parse_band_weights, default=(1.0, 1.0, 1.0, 1.0),
                   help="LL,LH,HL,HH weights; equal weights make WLF equal to MSE (SPEC §3.4), e.g. 1,2,2,2 does not")
    p.add_argument("--checkpointing_steps", type=int, default=5000, help="authors: 5,000")
    p.add_argument("--checkpoints_total_limit", type=int, default=None, help="keep only the newest N checkpoints")
    p.add_argument("--resume_from_checkpoint", default=None, help='"latest" or a checkpoint-N folder')
    p.add_argument("--validation_prompt", default=None, help="generate images of this prompt during training")
    p.add_argument("--validation_steps", type=int, default=1000)
    p.add_argument("--num_validation_images", type=int, default=1)
    p.add_argument("--report_to", default="tensorboard", help='an accelerate tracker, or "none"')
    return p
