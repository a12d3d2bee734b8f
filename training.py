"""Shared core of train_sd3.py and train_flux.py: WLF fine-tuning of a diffusers transformer at 4K.

What differs between the models (how prompts become embeddings, how the transformer is called, the defaults) is
their record in models.py; what every trainer shares (the Accelerator, noise seeding, skipped images, checkpoints)
is accelerated.py and checkpoints.py; everything else lives here: data, the text-embedding and latent caches,
timestep sampling, the loss, the optimiser, validation images, logging and the command-line flags.
"""
import argparse
import csv
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, gather_object, set_seed
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.optimization import get_scheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3, free_memory
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import lora
import outputs
import parquet_shards
from accelerated import (DataProblems, add_run_flags, checked_only, end_run, gather_union, make_accelerator,
                         step_generator, warn_problems)
from checkpoints import (add_checkpoint_flags, check_output_dir, clear_run, holds_run, resume, run_settings,
                         save_checkpoint)
from errors import HelpFormatter, UsageError, check_at_least
from imagefolder import (IMAGE_ERRORS, BucketSampler, KeyedImages, StreamSampler, bucket_sizes, collate, crop_pixels,
                         image_size, is_upscaled, load_record_image, nearest_bucket, read_metadata)
from models import MODELS, max_image_side
from partitioned_vae import check_size, load_vae, use_f16_vae
from wavelet import WaveletLoss, parse_band_weights

logger = get_logger(__name__)

ENCODE_BATCH_SIZE = 8  # captions per text-encoder call while filling the cache
RUN_FILES = ("train_summary.json", "losses.csv", "transformer", "model_index.json", "pytorch_lora_weights.safetensors")


#################################################################################
#                                     Data                                      #
#################################################################################

class TrainDataset(KeyedImages):
    """Pixels (or cached latent distributions) plus cached text embeddings of the imagefolder's records, each read
    from disk when asked for, keyed by (epoch, index) (imagefolder.KeyedImages). The pixels are the authors'
    pre-processing (PROTOCOL.md §1, imagefolder.crop_pixels): shorter side to the resolution, a random or centre
    crop, an optional mirror. Images smaller than the resolution (up-scaled) are listed under "upscaled"."""

    def __init__(self, records, data_dir, embedding_files, resolution, center_crop, random_flip, seed,
                 latent_files=None):
        super().__init__(records, random_flip, seed)
        self.data_dir, self.embedding_files, self.latent_files = Path(data_dir), embedding_files, latent_files
        self.resolution, self.center_crop = resolution, center_crop

    def name(self, record):
        return record["file_name"]

    def __getitem__(self, key):
        # An aspect-ratio bucket's batch is one size: a replacement for an unreadable image takes the size it replaces.
        self.size = self.items[key[1]].get("size", self.resolution)
        return super().__getitem__(key)

    def read(self, record, flip, rng):
        sample = self.read_latents(record, flip) if self.latent_files else self.read_pixels(record, flip, rng)
        sample.update(load_file(self.embedding_files[record["text"]]))
        return sample

    def read_pixels(self, record, flip, rng):
        """The pre-processed image of `record`."""
        image = load_record_image(record, self.data_dir)
        upscaled = [record["file_name"]] if is_upscaled(image, self.size) else []
        pixels = crop_pixels(image, self.size, None if self.center_crop else rng, flip)
        return {"pixels": pixels, "upscaled": upscaled}

    def read_latents(self, record, flip):
        """The cached latent distribution of `record`'s centre crop (or of its mirror image)."""
        with safe_open(self.latent_files[record["file_name"]], "pt") as cached:
            params = cached.get_tensor("latent_dist_flipped" if flip else "latent_dist")
            upscaled = [record["file_name"]] if cached.metadata().get("upscaled") == "1" else []
        return {"latent_dist": params, "upscaled": upscaled}


#################################################################################
#                       Text-embedding and latent caches                        #
#################################################################################

def hash_files(model_dir, patterns):
    """sha256 hex digest of a folder's path and the relative names and bytes of its files matching `patterns`."""
    root = Path(model_dir).resolve()
    digest = hashlib.sha256(str(root).encode())
    for path in sorted({p for pattern in patterns for p in root.glob(pattern) if p.is_file()}):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def text_encoder_identity(model_dir):
    """Identity of a pipeline's text encoders: its path and the configs / vocabularies of its encoders and
    tokenizers (never the weights, so the key can be computed without the encoders being there)."""
    return hash_files(model_dir, ["text_encoder*/*.json", "tokenizer*/*"])


def vae_identity(model_dir):
    """Identity of a pipeline's VAE: its path and config."""
    return hash_files(model_dir, ["vae/config.json"])


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
        path = Path(record.get("parquet_file") or Path(data_dir) / record["file_name"]).resolve()
        stat = path.stat()
        row = [record["row"]] if "parquet_file" in record else []  # a Parquet row: the shard and the row
        size = record.get("size", resolution)  # an aspect-ratio bucket's (width, height), else the square's side
        key = cache_key(path, *row, stat.st_size, stat.st_mtime_ns, identity, size, dtype)
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
            image = load_record_image(record, data_dir)
        except IMAGE_ERRORS as error:
            unreadable.append(f"{record['file_name']}: {error}")
            continue
        size = record.get("size", resolution)
        pixels = crop_pixels(image, size)
        pixels = torch.stack([pixels, pixels.flip(-1)]).to(vae.device, vae.dtype)
        with torch.no_grad():
            params = vae.encode(pixels).latent_dist.parameters
        upscaled = "1" if is_upscaled(image, size) else "0"
        save_atomically({"latent_dist": params[0], "latent_dist_flipped": params[1]}, path, {"upscaled": upscaled})
    return unreadable


#################################################################################
#                        Noise, timesteps and the loss                          #
#################################################################################

def weighted_mse(pred, target, weighting):
    """Plain flow-matching loss: mean of w_t * (pred - target)^2, in fp32 whatever the inputs' dtype."""
    return (weighting.float() * (pred.float() - target.float()) ** 2).mean()


def build_loss(loss, wavelet_levels=1, wavelet_band_weights=(1.0, 1.0, 1.0, 1.0), coefficient_dtype=None):
    """The training objective: "wlf" (the paper's wavelet loss, wavelet.WaveletLoss) or "mse".

    coefficient_dtype: compute the wavelet coefficients in this dtype, as the authors did (PROTOCOL.md §4, Numerics).
    """
    if loss == "wlf":
        return WaveletLoss(wavelet_levels, wavelet_band_weights, coefficient_dtype)
    return weighted_mse


@dataclass(frozen=True)
class LossSettings:
    """How training_loss draws the timesteps and forms x0, z_t and the target (the flags of the same names), and the
    dtype of the latents, sigma, z_t and the prediction (--loss_precision: fp32, or the mixed-precision dtype)."""
    weighting_scheme: str
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    precondition_outputs: bool = True
    latent_shift: bool = True
    loss_dtype: torch.dtype = torch.float32


def training_loss(transformer, predict, batch, vae, scheduler, loss_fn, generator, model_dtype, settings):
    """The loss of one micro-batch: latents, noise at timesteps drawn by `settings.weighting_scheme`, prediction,
    target.

    z_t = (1 - sigma) x0 + sigma eps. Preconditioned (the authors' code): x0_hat = output * (-sigma) + z_t against
    x0; otherwise the velocity eps - x0 (paper eq. 3). Weighted per sample by compute_loss_weighting_for_sd3.
    x0 = (latents - shift_factor) * scaling_factor; latent_shift=False drops the shift as the authors' SD3 trainer
    does. Latents, sigma, z_t and the prediction are `settings.loss_dtype` tensors (PROTOCOL.md §4).
    """
    loss_dtype = settings.loss_dtype
    if "latent_dist" in batch:
        latents = DiagonalGaussianDistribution(batch["latent_dist"].float()).sample(generator)
    else:
        with torch.no_grad():
            latents = vae.encode(batch["pixels"].to(vae.dtype)).latent_dist.sample(generator).float()
    shift = vae.config.shift_factor if settings.latent_shift else 0.0
    latents = (latents.to(loss_dtype) - shift) * vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=generator, device=latents.device).to(loss_dtype)
    u = compute_density_for_timestep_sampling(settings.weighting_scheme, latents.shape[0], settings.logit_mean,
                                              settings.logit_std, settings.mode_scale, latents.device, generator)
    indices = (u * scheduler.config.num_train_timesteps).long().cpu()
    timesteps = scheduler.timesteps[indices].to(latents.device)
    sigmas = scheduler.sigmas[indices].to(latents.device, loss_dtype).view(-1, 1, 1, 1)
    noisy = (1.0 - sigmas) * latents + sigmas * noise
    embeddings = {name: batch[name].to(model_dtype) for name in batch if name.endswith("prompt_embeds")}
    output = predict(transformer, noisy.to(model_dtype), timesteps, embeddings).to(loss_dtype)
    if settings.precondition_outputs:
        pred, target = output * (-sigmas) + noisy, latents
    else:
        pred, target = output, noise - latents
    return loss_fn(pred, target, compute_loss_weighting_for_sd3(settings.weighting_scheme, sigmas))


def make_predict(spec, transformer, guidance_scale=None):
    """spec.predict for this transformer: the guidance embedding fed `guidance_scale` where the transformer has one
    (FLUX.1-dev's, trained at --guidance_scale), no guidance input otherwise (SD3)."""
    return partial(spec.predict, guidance_scale=guidance_scale if transformer.config.get("guidance_embeds") else None)


def update_weights(accelerator, transformer, optimizer, lr_scheduler, loss, max_grad_norm):
    """Backward, then (on the last micro-batch of an accumulation) clip, step the optimiser and the schedule."""
    accelerator.backward(loss)
    if accelerator.sync_gradients and accelerator.distributed_type != DistributedType.DEEPSPEED:
        accelerator.clip_grad_norm_(transformer.parameters(), max_grad_norm)  # DeepSpeed clips itself
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def check_finite(accelerator, loss, step, output_dir):
    """Stop every process at the same step when any process's loss is not finite (before the weights change)."""
    if not torch.isfinite(accelerator.gather(loss.detach())).all():
        raise UsageError(f"The loss is not finite ({loss.item()}) at step {step + 1}: training stopped before "
                         f"updating the weights; the last checkpoint in {output_dir} is intact. Lower --learning_rate "
                         f"or check the data, then resume with --resume_from_checkpoint latest.")


#################################################################################
#                Optimiser, checkpoint model, validation, output                #
#################################################################################

def deepspeed_offloads_optimizer(accelerator):
    """Whether DeepSpeed runs this job with the optimizer states offloaded to CPU (or NVMe)."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return False
    zero = accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
    return zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)


def configure_deepspeed(accelerator, train_batch_size, max_grad_norm, use_8bit_adam):
    """Make DeepSpeed's config follow the flags (no dataloader goes through prepare()); refuse one it would ignore."""
    if use_8bit_adam and deepspeed_offloads_optimizer(accelerator):
        raise UsageError("--use_8bit_adam cannot apply: the accelerate config (ds_config.yaml) offloads the optimizer "
                         "to the CPU, where DeepSpeed runs its own AdamW (DeepSpeedCPUAdam). Drop the flag, or drop "
                         "offload_optimizer_device from the accelerate config to use 8-bit Adam on the GPU.")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        ds_config.update(train_micro_batch_size_per_gpu=train_batch_size, gradient_clipping=max_grad_norm)


def build_optimizer(params, accelerator, use_8bit_adam=False, **settings):
    """AdamW with `settings` (lr, betas, eps, weight_decay; the paper's in PROTOCOL.md §4).

    With DeepSpeed offloading the optimizer, its CPU AdamW (DeepSpeedCPUAdam, fp32 states in host memory) is the
    only choice: we build it ourselves so that betas and eps are ours too (accelerate's automatic swap keeps only
    lr and weight decay). Otherwise use_8bit_adam takes bitsandbytes' AdamW8bit.
    """
    if deepspeed_offloads_optimizer(accelerator):
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # compiled on first use: make_accelerator said so

        accelerator.state.deepspeed_plugin.deepspeed_config["zero_force_ds_cpu_optimizer"] = False
        return DeepSpeedCPUAdam(params, adamw_mode=True, **settings)
    if use_8bit_adam:
        try:
            import bitsandbytes
        except ImportError as error:
            raise UsageError("--use_8bit_adam needs bitsandbytes (`pip install bitsandbytes`, CUDA GPUs only); "
                             "install it or drop the flag to use torch's AdamW.") from error
        return bitsandbytes.optim.AdamW8bit(params, **settings)
    return torch.optim.AdamW(params, **settings)


def link_or_copy(src, dst):
    """Hard-link src to dst (the frozen multi-GB components then cost no disk), copying across file systems."""
    if os.path.lexists(dst):
        os.remove(dst)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def save_checkpoint_transformer(accelerator, transformer, checkpoint):
    """The diffusers transformer/ of a checkpoint, which the generation scripts load (a LoRA one holds its adapter)."""
    save_transformer(accelerator, transformer, Path(checkpoint) / "transformer")


def save_transformer(accelerator, transformer, folder):
    """The trained transformer as a diffusers folder (written by the main process; call it on every process)."""
    state_dict = accelerator.get_state_dict(transformer)
    if accelerator.is_main_process:
        shutil.rmtree(folder, ignore_errors=True)
        accelerator.unwrap_model(transformer).save_pretrained(folder, state_dict=state_dict, safe_serialization=True)


def save_pipeline(accelerator, transformer, pretrained_dir, output_dir):
    """Make output_dir a complete diffusers pipeline: the fine-tuned transformer plus the original components."""
    save_transformer(accelerator, transformer, Path(output_dir) / "transformer")
    if not accelerator.is_main_process:
        return
    source, output_dir = Path(pretrained_dir), Path(output_dir)
    index = json.loads((source / "model_index.json").read_text())
    for name, entry in index.items():
        if name.startswith("_") or name == "transformer" or not isinstance(entry, list) or None in entry:
            continue
        shutil.copytree(source / name, output_dir / name, copy_function=link_or_copy, dirs_exist_ok=True)
    shutil.copy2(source / "model_index.json", output_dir / "model_index.json")  # last: marks the pipeline complete


def text_encoder_names(pretrained_dir):
    """The pipeline's text-encoder component names (text_encoder, text_encoder_2, ...)."""
    index = json.loads((Path(pretrained_dir) / "model_index.json").read_text())
    return [name for name in index if name.startswith("text_encoder")]


@dataclass(frozen=True)
class ValidationSettings:
    """What log_validation generates every `steps` steps: `count` images of resolution² pixels into `folder`, from the
    cached embeddings of the prompt and of "" (`embedding_files`) and a CPU generator seeded with `seed`."""
    embedding_files: tuple
    folder: Path
    resolution: int
    count: int
    seed: int
    steps: int


def log_validation(accelerator, spec, model_dir, vae, transformer, step, settings):
    """`settings.count` images from the stock pipeline (cached embeddings, the F=16 VAE, in its dtype) as PNGs."""
    positive, negative = ({k: v[None].to(vae.dtype) for k, v in load_file(path, device=str(vae.device)).items()}
                          for path in settings.embedding_files)
    model = accelerator.unwrap_model(transformer)
    no_text_encoders = {name: None for name in text_encoder_names(model_dir)}
    pipe = spec.pipeline_class.from_pretrained(model_dir, transformer=model, vae=vae, **no_text_encoders)
    use_f16_vae(pipe)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(settings.seed)
    model.eval()
    # Under mixed precision the trained weights may be fp32 and the VAE bf16: autocast lets the two meet.
    with torch.autocast(vae.device.type, dtype=vae.dtype, enabled=vae.dtype != torch.float32):
        images = [pipe(height=settings.resolution, width=settings.resolution, generator=generator,
                       **spec.validation_kwargs(positive, negative)).images[0] for _ in range(settings.count)]
    model.train()
    settings.folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        with outputs.atomic_path(settings.folder / f"step-{step:06d}-{i}.png") as tmp:
            image.save(tmp)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            pixels = np.stack([np.asarray(image) for image in images])
            tracker.writer.add_images("validation", pixels, step, dataformats="NHWC")
    del pipe
    free_memory()
    return images


#################################################################################
#                     Setup, data, bookkeeping and logging                      #
#################################################################################

def check_args(args, spec):
    """Fail at start, with the flag to fix, on settings that would otherwise fail hours in."""
    try:
        check_size(args.resolution, args.resolution)
    except UsageError as error:
        raise UsageError(f"--resolution: {error}") from None
    model_dir = args.pretrained_model_name_or_path
    if not Path(model_dir, "model_index.json").is_file():
        raise UsageError(f"--pretrained_model_name_or_path {model_dir} is not a local diffusers pipeline folder (no "
                         f"model_index.json). Download the pipeline first, e.g. into ./pretrain/.")
    check_pipeline_class(model_dir, spec)
    for flag in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "checkpointing_steps"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be at least 1, got {getattr(args, flag)}.")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise UsageError("--checkpoints_total_limit must be at least 1 (or left out to keep every checkpoint).")
    check_at_least(1, max_sequence_length=args.max_sequence_length, wavelet_levels=args.wavelet_levels,
                   validation_steps=args.validation_steps, num_validation_images=args.num_validation_images)
    check_at_least(0, dataloader_num_workers=args.dataloader_num_workers, lr_warmup_steps=args.lr_warmup_steps)
    if args.overwrite_output_dir and args.resume_from_checkpoint:
        raise UsageError("--overwrite_output_dir starts a new run and --resume_from_checkpoint continues one: give "
                         "one of them.")
    config = spec.transformer_class.load_config(model_dir, subfolder="transformer")
    if max_image_side(config) and args.resolution > max_image_side(config):  # SD3's positional embedding
        raise UsageError(f"--resolution {args.resolution} is too large for this transformer: its positional embedding "
                         f"covers {config['pos_embed_max_size']} patches a side, i.e. {max_image_side(config)} pixels "
                         f"with the F=16 VAE.")


def check_pipeline_class(model_dir, spec):
    """UsageError naming the model unless model_index.json's _class_name is the pipeline this trainer fine-tunes."""
    try:
        found = json.loads(Path(model_dir, "model_index.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError) as error:
        raise UsageError(f"--pretrained_model_name_or_path {model_dir}: unreadable model_index.json "
                         f"({error}).") from None
    expected = spec.pipeline_class.__name__
    if found != expected:
        other = [f"train_{name}.py" for name, m in MODELS.items() if m.pipeline_class.__name__ == found]
        hint = f": use {other[0]}" if other else ""
        raise UsageError(f"--pretrained_model_name_or_path {model_dir} holds a {found} pipeline, but this trainer "
                         f"fine-tunes {spec.title} ({expected}){hint}.")


def load_transformer(spec, model_dir, dtype, gradient_checkpointing):
    """The pipeline's transformer in `dtype`, every weight trainable, in training mode."""
    transformer = spec.transformer_class.from_pretrained(model_dir, subfolder="transformer", torch_dtype=dtype)
    transformer.requires_grad_(True).train()
    if gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    return transformer


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


def read_training_data(data_dir, image_column=parquet_shards.IMAGE_COLUMN,
                       caption_column=parquet_shards.CAPTION_COLUMN):
    """The usable records of `data_dir` (--instance_data_dir: an imagefolder, or a folder of Parquet shards read in
    place) and the DataProblems of the others."""
    if parquet_shards.is_parquet_folder(data_dir):
        rows, shard_problems = parquet_shards.list_rows(data_dir, image_column, caption_column)
        records = [r for r in rows if r["text"] is not None]
        found = {"metadata_lines": shard_problems + [f"{r['file_name']}: {r['caption_problem']}" for r in rows
                                                     if r["text"] is None], "missing_images": []}
    else:
        try:
            records, found = read_metadata(data_dir, rows=True)
        except FileNotFoundError as error:
            raise UsageError(f"--instance_data_dir: {error}") from None
    warn_problems("metadata lines", found["metadata_lines"])
    warn_problems("missing images", found["missing_images"])
    if not records:
        bad, missing = found["metadata_lines"], found["missing_images"]
        raise UsageError(f"No usable image in {data_dir}: {len(bad)} bad lines, {len(missing)} missing "
                         f"images ({'; '.join((bad + missing)[:3])}).")
    return records, DataProblems(found)


def assign_buckets(records, data_dir, sizes, problems):
    """Give each record the size of its nearest aspect-ratio bucket (from its image header); drop the unreadable ones
    (counted as corrupt). Returns the records kept and {"WxH": images} of every bucket used."""
    kept = []
    for record in tqdm(records, desc="Buckets", unit="img", disable=len(records) < 1000):
        try:
            record["size"] = nearest_bucket(*image_size(record, data_dir), sizes)
        except IMAGE_ERRORS as error:
            problems.corrupt_images.add(f"{record['file_name']}: {' '.join(str(error).split())[:120]}")
            continue
        kept.append(record)
    warn_problems("unreadable images", sorted(problems.corrupt_images))
    if not kept:
        raise UsageError(f"None of the images in {data_dir} can be read.")
    counts = {}
    for record in kept:
        name = f"{record['size'][0]}x{record['size'][1]}"
        counts[name] = counts.get(name, 0) + 1
    return kept, dict(sorted(counts.items(), key=lambda item: -item[1]))


def embed_captions(accelerator, spec, model_dir, captions, cache_dir, max_sequence_length, dtype):
    """Fill the text-embedding cache (main process of each node); returns ({caption: file}, captions embedded)."""
    files = embedding_files(captions, cache_dir, text_encoder_identity(model_dir), max_sequence_length, dtype)
    missing = sum(not path.is_file() for path in files.values())
    logger.info(f"{missing} of {len(files)} captions are not in the embedding cache {Path(cache_dir) / 'embeddings'}: "
                + ("loading the text encoders to embed them" if missing else "the text encoders are not loaded"))
    embedded = 0
    if accelerator.is_local_main_process:
        loader = partial(load_text_encoders, spec.pipeline_class, model_dir, dtype, accelerator.device)
        embedded = cache_embeddings(files, loader, spec.encode_prompts, max_sequence_length)
    accelerator.wait_for_everyone()
    return files, sum(gather_object([embedded]))


def cache_training_latents(accelerator, vae, records, data_dir, files, resolution, problems):
    """Fill the latent cache `files` (records split over the processes); returns the readable records."""
    mine = records[accelerator.process_index::accelerator.num_processes]
    unreadable = gather_union(cache_latents(vae, mine, data_dir, files, resolution))
    problems.corrupt_images.update(unreadable)
    bad = {problem.split(": ", 1)[0] for problem in unreadable}
    records = [r for r in records if r["file_name"] not in bad]
    warn_problems("unreadable images", unreadable)
    if not records:
        raise UsageError(f"None of the images in {data_dir} can be read.")
    return records


def read_losses(path):
    """The per-step losses of losses.csv, in step order (a last row cut short by a kill is left out)."""
    return [float(row["loss"]) for row in outputs.read_csv_rows(path)]


def open_loss_log(path, keep_until_step):
    """losses.csv (step, loss, lr) open for appending, rows after `keep_until_step` dropped (the kept rows are
    rewritten atomically first, a row cut short left out); .writer writes rows."""
    rows = [row for row in outputs.read_csv_rows(path) if int(row["step"]) <= keep_until_step]
    outputs.write_csv(path, rows, ["step", "loss", "lr"])
    log = open(path, "a", newline="", buffering=1)
    log.writer = csv.DictWriter(log, fieldnames=["step", "loss", "lr"])
    return log


def log_step(accelerator, progress, loss_log, step, step_losses, lr):
    """The step's loss (mean over micro-batches and processes) to the progress bar, the trackers and losses.csv."""
    step_loss = accelerator.gather(torch.stack(step_losses).mean()).mean().item()
    progress.update(1)
    progress.set_postfix(loss=f"{step_loss:.4g}", lr=f"{lr:.2g}")
    accelerator.log({"loss": step_loss, "lr": lr}, step=step)
    if loss_log is not None:
        loss_log.writer.writerow({"step": step, "loss": repr(step_loss), "lr": lr})


def write_summary(accelerator, args, status, step, problems, run):
    """Merge the problems of all processes; write train_summary.json (main process) from `run`'s facts; return it."""
    gathered = problems.gather()
    if not accelerator.is_main_process:
        return None
    path = Path(args.output_dir) / "train_summary.json"
    losses = read_losses(Path(args.output_dir) / "losses.csv")
    elapsed, trained = time.time() - run["started"], step - run["resumed_from_step"]
    summary = {
        "status": status, "steps": step, "resumed_from_step": run["resumed_from_step"],
        "max_train_steps": args.max_train_steps,
        "final_loss": losses[-1] if losses else None, "losses": losses,
        **problems.summary(gathered),
        **run["caches"], "buckets": run["buckets"], "seconds": round(elapsed, 3),
        "images_per_second": round(trained * run["images_per_step"] / elapsed, 4) if elapsed > 0 and trained else None,
        "settings": run_settings(args),
    }
    outputs.write_json(path, summary)
    logger.info(f"{status.split(':')[0]} at step {step}; skipped {summary['skipped']}, "
                f"up-scaled {summary['upscaled_images']}; see {path}")
    return summary


#################################################################################
#                                   Training                                    #
#################################################################################

def train(args, spec):
    """Fine-tune the transformer of a `spec` (models.MODELS) pipeline; returns train_summary.json (main process).
    Every flag is checked first; then the launch's main process holds --output_dir until the run ends."""
    check_args(args, spec)
    lora_config = lora.check_training_flags(args, spec.transformer_class, args.pretrained_model_name_or_path)
    with outputs.FolderLock(args.output_dir, "--output_dir"):
        check_output_dir(args, Path(args.output_dir), RUN_FILES)
        if args.check_only:  # the data's metadata too, as the run reads it first; then stop
            return checked_only(lambda: len(read_training_data(args.instance_data_dir, args.image_column,
                                                               args.caption_column)[0]))
        return fine_tune(args, spec, lora_config)


def fine_tune(args, spec, lora_config):
    """The run itself (train's checks passed, --output_dir held): setup, data, model, loop, final save."""
    # Setup (DeepSpeed comes from `accelerate launch --config_file ds_config.yaml`):
    model_dir, output_dir = args.pretrained_model_name_or_path, Path(args.output_dir)
    accelerator = make_accelerator(output_dir, args.gradient_accumulation_steps, args.mixed_precision, args.report_to)
    if args.overwrite_output_dir and accelerator.is_main_process and holds_run(output_dir, RUN_FILES):
        clear_run(output_dir)
    accelerator.wait_for_everyone()
    configure_deepspeed(accelerator, args.train_batch_size, args.max_grad_norm, args.use_8bit_adam)
    is_deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    set_seed(args.seed)
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32)
    device = accelerator.device

    # Setup data (every metadata line is checked now; images are decoded lazily), with the text-embedding cache:
    records, problems = read_training_data(args.instance_data_dir, args.image_column, args.caption_column)
    buckets = None
    if args.aspect_ratio_buckets:  # each image to its nearest bucket, resized to cover it and centre-cropped
        max_side = max_image_side(spec.transformer_class.load_config(model_dir, subfolder="transformer"))
        sizes = [size for size in bucket_sizes(args.resolution) if not max_side or max(size) <= max_side]
        records, buckets = assign_buckets(records, args.instance_data_dir, sizes, problems)
    cache_dir = Path(args.data_cache_dir or output_dir / "cache")
    validation_prompts = [args.validation_prompt, ""] if args.validation_prompt else []
    captions = list(dict.fromkeys([r["text"] for r in records] + validation_prompts))
    files, embedded = embed_captions(accelerator, spec, model_dir, captions, cache_dir, args.max_sequence_length,
                                     weight_dtype)
    # Frozen F=16 VAE; optionally cache latents (centre crop and its mirror image), split over the processes:
    vae = load_vae(model_dir, torch_dtype=weight_dtype, flag="--pretrained_model_name_or_path")
    vae.to(device).requires_grad_(False)
    latents = None
    if args.cache_latents:
        latents = latent_files(records, args.instance_data_dir, cache_dir, vae_identity(model_dir), args.resolution,
                               weight_dtype)
        records = cache_training_latents(accelerator, vae, records, args.instance_data_dir, latents, args.resolution,
                                         problems)
        if not args.validation_prompt:
            vae.to("cpu")  # off the accelerator: only its config (latent scale and shift) is still needed
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(model_dir, subfolder="scheduler")
    dataset = TrainDataset(records, args.instance_data_dir, files, args.resolution,
                           args.center_crop or args.cache_latents or args.aspect_ratio_buckets, args.random_flip,
                           args.seed, latents)

    # Create the model, optimiser and learning-rate schedule:
    # DeepSpeed keeps fp32 master weights in its (offloaded) optimizer and runs the module in its precision: load it
    # in that precision (half the host memory per process). Plain accelerate trains fp32 weights under autocast.
    # A LoRA run keeps the frozen base in the training precision and (without DeepSpeed) the adapter in fp32.
    transformer = load_transformer(spec, model_dir, weight_dtype if is_deepspeed or lora_config else torch.float32,
                                   args.gradient_checkpointing)
    params = transformer.parameters()
    if lora_config:
        params = lora.attach_for_training(transformer, lora_config, None if is_deepspeed else torch.float32)
        lora.register_checkpoint_hooks(accelerator, spec.pipeline_class)
    predict = make_predict(spec, transformer, getattr(args, "guidance_scale", None))
    optimizer = build_optimizer(params, accelerator, args.use_8bit_adam, lr=args.learning_rate,
                                betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                                weight_decay=args.adam_weight_decay)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer,  # stepped once per process, as in diffusers' examples
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes)
    transformer, optimizer, lr_scheduler = accelerator.prepare(transformer, optimizer, lr_scheduler)
    model_dtype = accelerator.unwrap_model(transformer).dtype
    loss_fn, loss_settings = loss_from_args(args, weight_dtype)

    # Resume (model, optimiser, schedule; the data stream and the noise follow from the step):
    start_step = resume(accelerator, output_dir, args.resume_from_checkpoint, problems)
    world_batches = args.gradient_accumulation_steps * accelerator.num_processes
    dataloader = make_dataloader(dataset, [r["size"] for r in records] if buckets else None, args, accelerator,
                                 start_step * world_batches)
    validation = ValidationSettings(tuple(files[p] for p in validation_prompts), output_dir / "validation",
                                    args.resolution, args.num_validation_images, args.seed,
                                    args.validation_steps) if args.validation_prompt else None
    accelerator.init_trackers("diffusion-4k", config={k: str(v) for k, v in vars(args).items()})
    loss_log = open_loss_log(output_dir / "losses.csv", start_step) if accelerator.is_main_process else None
    run = {"resumed_from_step": start_step, "images_per_step": args.train_batch_size * world_batches,
           "caches": {"text_encoders_loaded": embedded > 0, "captions_embedded": embedded, "captions": len(captions),
                      "train_images": len(records), "latents_cached": bool(args.cache_latents),
                      "engine": describe_engine(accelerator, optimizer)}, "buckets": buckets}
    logger.info(f"{len(records)} images, {run['images_per_step']} images per step ({args.train_batch_size} per "
                f"device x {accelerator.num_processes} processes x {args.gradient_accumulation_steps} accumulation), "
                f"steps {start_step} -> {args.max_train_steps}, loss {args.loss}")

    # Training loop:
    global_step, micro_step, step_losses, run["started"] = start_step, 0, [], time.time()
    write_summary(accelerator, args, "running", start_step, problems, run)  # an earlier "completed" is now stale
    progress = tqdm(total=args.max_train_steps, initial=start_step, desc="Steps",
                    disable=not accelerator.is_local_main_process)
    data = iter(dataloader)
    try:
        while global_step < args.max_train_steps:
            batch = next(data)
            problems.note(batch)
            batch = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}
            with accelerator.accumulate(transformer):
                generator = step_generator(args.seed, global_step, micro_step, accelerator.process_index, device)
                loss = training_loss(transformer, predict, batch, vae, scheduler, loss_fn, generator, model_dtype,
                                     loss_settings)
                check_finite(accelerator, loss, global_step, output_dir)  # every process stops here together
                update_weights(accelerator, transformer, optimizer, lr_scheduler, loss, args.max_grad_norm)
            step_losses.append(loss.detach())
            micro_step += 1
            if not accelerator.sync_gradients:
                continue
            global_step, micro_step = global_step + 1, 0
            log_step(accelerator, progress, loss_log, global_step, step_losses, lr_scheduler.get_last_lr()[0])
            step_losses = []
            if global_step % args.checkpointing_steps == 0:
                state = {"global_step": global_step, "base_pipeline": str(Path(model_dir).resolve()),
                         **problems.gather(), "settings": run_settings(args)}
                # A LoRA checkpoint holds its adapter (lora.register_checkpoint_hooks), not a transformer/:
                save_checkpoint(accelerator, output_dir, global_step, state, args.checkpoints_total_limit,
                                None if lora_config else partial(save_checkpoint_transformer, accelerator, transformer))
            if validation and global_step % validation.steps == 0 and accelerator.is_main_process:
                log_validation(accelerator, spec, model_dir, vae, transformer, global_step, validation)
    except UsageError as error:  # raised on every process at the same step (non-finite loss, failed checkpoint)
        write_summary(accelerator, args, f"stopped: {error}", global_step, problems, run)
        raise
    finally:
        progress.close()
        if loss_log is not None:
            loss_log.close()
    # Save the fine-tuned pipeline (the fine-tuned transformer + the original components), then say "completed":
    accelerator.wait_for_everyone()
    try:
        saved = save_final(accelerator, transformer, lora_config, args.merge_lora, spec, model_dir, output_dir)
    except OSError as error:  # a full disk, a quota: the summary must not say "completed"
        write_summary(accelerator, args, f"stopped: could not save the final model ({error})", global_step, problems,
                      run)
        raise UsageError(f"Could not save the final model in {output_dir} ({error}); the checkpoints are intact: free "
                         f"disk space, then resume with --resume_from_checkpoint latest.") from error
    if validation and accelerator.is_main_process and args.max_train_steps % validation.steps:
        log_validation(accelerator, spec, model_dir, vae, transformer, global_step, validation)
    summary = write_summary(accelerator, args, "completed", global_step, problems, run)
    end_run(accelerator)
    logger.info(f"Saved {saved} to {output_dir}")
    return summary


def loss_from_args(args, weight_dtype):
    """(loss_fn, LossSettings) of the flags; --loss_precision autocast: in the mixed-precision dtype, as the authors."""
    autocast = args.loss_precision == "autocast"
    loss_fn = build_loss(args.loss, args.wavelet_levels, args.wavelet_band_weights, weight_dtype if autocast else None)
    return loss_fn, LossSettings(args.weighting_scheme, logit_mean=args.logit_mean, logit_std=args.logit_std,
                                 mode_scale=args.mode_scale, precondition_outputs=args.precondition_outputs,
                                 latent_shift=args.latent_shift, loss_dtype=weight_dtype if autocast else torch.float32)


def make_dataloader(dataset, bucket_of, args, accelerator, start_batch):
    """The process's data loader from global batch `start_batch` (the step times the batches per step): squares, or
    with `bucket_of` (each record's bucket size) global batches each from one bucket."""
    if bucket_of:
        sampler = BucketSampler(bucket_of, args.train_batch_size, args.seed, accelerator.process_index,
                                accelerator.num_processes, start_batch=start_batch)
    else:
        sampler = StreamSampler(len(dataset), args.train_batch_size, args.seed, accelerator.process_index,
                                accelerator.num_processes, start_batch=start_batch)
    return DataLoader(dataset, batch_size=args.train_batch_size, sampler=sampler, collate_fn=collate,
                      num_workers=args.dataloader_num_workers, pin_memory=accelerator.device.type == "cuda")


def save_final(accelerator, transformer, lora_config, merge_lora, spec, model_dir, output_dir):
    """The LoRA adapter (and with --merge_lora the merged pipeline), or the fine-tuned pipeline; returns what."""
    if lora_config:  # the adapter as diffusers' LoRA trainers write it; with --merge_lora also the merged pipeline
        lora.save_adapter(accelerator, transformer, spec.pipeline_class, output_dir)
        if merge_lora:
            lora.merged_transformer(accelerator.unwrap_model(transformer))
    if not lora_config or merge_lora:
        save_pipeline(accelerator, transformer, model_dir, output_dir)
    if lora_config:
        return "the LoRA adapter and the merged pipeline" if merge_lora else "the LoRA adapter"
    return "the fine-tuned pipeline"


#################################################################################
#              Command-line flags of train_sd3.py and train_flux.py             #
#################################################################################

def build_parser(description, spec):
    """The trainers' flags: diffusers' names, the paper's defaults (PROTOCOL.md §4), per model from `spec`."""
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", required=True, help="local diffusers pipeline folder")
    p.add_argument("--instance_data_dir", required=True,
                   help="imagefolder with metadata.jsonl (file_name, text), or a folder of Parquet shards (the Hub's)")
    p.add_argument("--image_column", default=parquet_shards.IMAGE_COLUMN, help="Parquet shards: the image column")
    p.add_argument("--caption_column", default=parquet_shards.CAPTION_COLUMN, help="Parquet shards: the caption")
    p.add_argument("--output_dir", default="outputs/wlf", help="checkpoints, logs, at the end the fine-tuned pipeline")
    p.add_argument("--data_cache_dir", default=None, help="text-embedding / latent cache (default: OUTPUT_DIR/cache)")
    p.add_argument("--resolution", type=int, default=4096, help="square training size, a multiple of 32 (paper: 4096)")
    p.add_argument("--center_crop", action="store_true", help="centre crop instead of a random crop")
    p.add_argument("--aspect_ratio_buckets", action="store_true",
                   help="train each image at its nearest aspect-ratio bucket of about resolution² pixels (Sana's "
                        "table, 1:4 to 4:1), resized to cover and centre-cropped; off: square crops, as the authors")
    p.add_argument("--cache_latents", action="store_true",
                   help="encode each image once (centre crop and its mirror) and cache the latent distributions")
    p.add_argument("--max_sequence_length", type=int, default=spec.train_max_sequence_length,
                   help="T5 tokens per caption (the authors' training scripts)")
    add_run_flags(p)  # seed, batch, steps, optimiser, precision, validation steps, tracker (accelerated.py)
    p.set_defaults(train_batch_size=8,  # per device; paper: SD3 8, Flux 4 (train_flux.sh passes 4)
                   gradient_accumulation_steps=1,
                   gradient_checkpointing=True,  # paper: on
                   max_train_steps=20000,  # paper: 20,000
                   learning_rate=1e-6,  # paper: 1e-6
                   mixed_precision=None,  # what `accelerate launch` says (ds_config.yaml: bf16), else bf16
                   num_validation_images=1)
    p.add_argument("--use_8bit_adam", action="store_true",
                   help="bitsandbytes AdamW8bit; refused when DeepSpeed offloads the optimizer (ds_config.yaml does)")
    p.add_argument("--weighting_scheme", default=spec.train_weighting_scheme,
                   choices=["sigma_sqrt", "logit_normal", "mode", "cosmap", "none"],
                   help="timestep density and loss weight (diffusers.training_utils)")
    p.add_argument("--logit_mean", type=float, default=0.0)
    p.add_argument("--logit_std", type=float, default=1.0)
    p.add_argument("--mode_scale", type=float, default=1.29)
    p.add_argument("--precondition_outputs", action=argparse.BooleanOptionalAction, default=True,
                   help="the authors' x0 target (output * -sigma + z_t vs x0); "
                        "--no-precondition_outputs: velocity eps - x0")
    p.add_argument("--latent_shift", action=argparse.BooleanOptionalAction, default=True,
                   help="x0 = (latents - shift_factor) * scaling_factor, the form the pipelines decode; "
                        "--no-latent_shift: latents * scaling_factor, as the authors' SD3 trainer")
    p.add_argument("--loss_precision", choices=["fp32", "autocast"], default="fp32",
                   help="fp32: latents, sigma, z_t, prediction and loss in fp32; autocast: in the --mixed_precision "
                        "dtype, the wavelet coefficients too, as the authors (only the squared errors in fp32)")
    if spec.train_guidance_scale is not None:
        p.add_argument("--guidance_scale", type=float, default=spec.train_guidance_scale,
                       help="guidance embedding value while training")
    p.add_argument("--loss", choices=["wlf", "mse"], default="wlf", help="the paper's wavelet loss or plain MSE")
    p.add_argument("--wavelet_levels", type=int, default=1)
    p.add_argument("--wavelet_band_weights", type=parse_band_weights, default=(1.0, 1.0, 1.0, 1.0),
                   help="LL,LH,HL,HH weights; equal ones make WLF equal to MSE (orthonormal Haar); 1,2,2,2 does not")
    add_checkpoint_flags(p)  # --checkpointing_steps, --resume_from_checkpoint, ... (checkpoints.py)
    p.set_defaults(checkpointing_steps=5000)  # authors: 5,000
    p.add_argument("--validation_prompt", default=None, help="generate images of this prompt during training")
    lora.add_training_flags(p)
    return p
