"""The two models Diffusion-4K fine-tunes, one frozen record each: every script reads its per-model settings here."""
from dataclasses import dataclass, fields
from typing import Callable, Optional

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline

VAE_FACTOR = 16  # the F=16 partitioned VAE: an h x w latent is a 16h x 16w image


def encode_sd3_prompts(pipe, prompts, max_sequence_length):
    """CLIP-L + CLIP-G + T5 embeddings, as StableDiffusion3Pipeline.encode_prompt makes them (no CFG copy)."""
    prompt_embeds, _, pooled_prompt_embeds, _ = pipe.encode_prompt(
        prompts, None, None, do_classifier_free_guidance=False, max_sequence_length=max_sequence_length)
    return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled_prompt_embeds}


def encode_flux_prompts(pipe, prompts, max_sequence_length):
    """T5 sequence embeddings and the pooled CLIP-L embedding, as FluxPipeline.encode_prompt makes them."""
    prompt_embeds, pooled_prompt_embeds, _ = pipe.encode_prompt(prompts, None, max_sequence_length=max_sequence_length)
    return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled_prompt_embeds}


def predict_sd3(transformer, noisy_latents, timesteps, embeddings, guidance_scale=None):
    """The SD3 transformer's output for (B, 16, h, w) latents; SD3 takes timesteps in [0, 1000] and no guidance."""
    return transformer(hidden_states=noisy_latents, timestep=timesteps,
                       encoder_hidden_states=embeddings["prompt_embeds"],
                       pooled_projections=embeddings["pooled_prompt_embeds"], return_dict=False)[0]


def predict_flux(transformer, noisy_latents, timesteps, embeddings, guidance_scale=None):
    """The Flux transformer's output for (B, 16, h, w) latents: packed into 2x2 patches with their image ids,
    timesteps scaled to [0, 1], the guidance embedding fed `guidance_scale`; unpacked again to (B, 16, h, w)."""
    b, c, h, w = noisy_latents.shape
    device, dtype = noisy_latents.device, noisy_latents.dtype
    packed = FluxPipeline._pack_latents(noisy_latents, b, c, h, w)
    image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, device, dtype)
    text_ids = torch.zeros(embeddings["prompt_embeds"].shape[1], 3, device=device, dtype=dtype)
    guidance = None if guidance_scale is None else torch.full((b,), float(guidance_scale), device=device)
    output = transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                         pooled_projections=embeddings["pooled_prompt_embeds"],
                         encoder_hidden_states=embeddings["prompt_embeds"], txt_ids=text_ids, img_ids=image_ids,
                         return_dict=False)[0]
    return FluxPipeline._unpack_latents(output, h * VAE_FACTOR, w * VAE_FACTOR, VAE_FACTOR)


@dataclass(frozen=True)
class Sampling:
    """How images are sampled: denoising steps, guidance scale, T5 tokens per prompt."""
    num_inference_steps: int
    guidance_scale: float
    max_sequence_length: int


SAMPLING_FLAGS = tuple(field.name for field in fields(Sampling))  # each a flag of the generating scripts


@dataclass(frozen=True)
class ModelSpec:
    """Everything that differs between SD3 and Flux: classes, prompt encoding, the transformer call, the settings.
    encode_prompts(pipe, prompts, max_sequence_length) -> {name ending in "prompt_embeds": (B, ...) tensor};
    predict(transformer, noisy_latents, timesteps, embeddings, guidance_scale) -> the raw output, (B, 16, h, w)."""
    title: str
    hub_repo: str
    checkpoint_path: str  # where the README's download command puts the weights
    script: str  # the generation command line
    pipeline_class: type
    transformer_class: type
    encode_prompts: Callable
    predict: Callable
    negative_prompt: bool  # classifier-free guidance with a negative prompt (FLUX.1-dev has none)
    train_max_sequence_length: int  # the authors' trainers' defaults (their launch scripts keep them)
    train_weighting_scheme: str
    train_guidance_scale: Optional[float]  # the guidance embedding's value while training (None: no such input)
    inference: Sampling  # the paper's generation settings
    evaluation: Sampling  # generate_and_eval_fid.py: the paper's steps, the authors' T5 lengths and guidance
    authors_evaluation: Sampling  # the authors' generate_and_eval_fid.py (--protocol authors, PROTOCOL.md §6)

    def validation_kwargs(self, embeddings, negative_embeddings):
        """Pipeline arguments for validation images: cached embeddings (and negative ones), inference settings."""
        kwargs = {"prompt_embeds": embeddings["prompt_embeds"],
                  "pooled_prompt_embeds": embeddings["pooled_prompt_embeds"],
                  "num_inference_steps": self.inference.num_inference_steps,
                  "guidance_scale": self.inference.guidance_scale}
        if self.negative_prompt:
            kwargs.update(negative_prompt_embeds=negative_embeddings["prompt_embeds"],
                          negative_pooled_prompt_embeds=negative_embeddings["pooled_prompt_embeds"])
        return kwargs


MODELS = {
    # SD3 inference: 28 steps, guidance 7, empty negative prompt (paper), diffusers' default T5 length 256.
    "sd3": ModelSpec(
        title="Stable Diffusion 3 medium", hub_repo="stabilityai/stable-diffusion-3-medium-diffusers",
        checkpoint_path="pretrain/stable-diffusion-3-medium-diffusers", script="test_sd3.py",
        pipeline_class=StableDiffusion3Pipeline, transformer_class=SD3Transformer2DModel,
        encode_prompts=encode_sd3_prompts, predict=predict_sd3, negative_prompt=True,
        train_max_sequence_length=77, train_weighting_scheme="logit_normal", train_guidance_scale=None,
        inference=Sampling(num_inference_steps=28, guidance_scale=7.0, max_sequence_length=256),
        evaluation=Sampling(num_inference_steps=28, guidance_scale=7.0, max_sequence_length=77),
        authors_evaluation=Sampling(num_inference_steps=50, guidance_scale=7.0, max_sequence_length=77)),
    # FLUX.1-dev: the authors' trainer defaults (T5 length 77, uniform timesteps: PROTOCOL.md §4), guidance embedding
    # 3.5 while training; T5 length 512 for generation, 50 steps at guidance 5 (paper).
    "flux": ModelSpec(
        title="FLUX.1-dev", hub_repo="black-forest-labs/FLUX.1-dev", checkpoint_path="pretrain/FLUX.1-dev",
        script="test_flux.py",
        pipeline_class=FluxPipeline, transformer_class=FluxTransformer2DModel,
        encode_prompts=encode_flux_prompts, predict=predict_flux, negative_prompt=False,
        train_max_sequence_length=77, train_weighting_scheme="none", train_guidance_scale=3.5,
        inference=Sampling(num_inference_steps=50, guidance_scale=5.0, max_sequence_length=512),
        evaluation=Sampling(num_inference_steps=50, guidance_scale=7.0, max_sequence_length=512),
        authors_evaluation=Sampling(num_inference_steps=50, guidance_scale=7.0, max_sequence_length=512)),
}


def max_image_side(transformer_config, vae_factor=VAE_FACTOR):
    """The largest image side the transformer's positional table covers (SD3), or None (Flux: rotary, no table)."""
    patches = transformer_config.get("pos_embed_max_size")
    return patches * transformer_config["patch_size"] * vae_factor if patches else None


def model_of(pipe):
    """The ModelSpec of a pipeline object."""
    return next(spec for spec in MODELS.values() if isinstance(pipe, spec.pipeline_class))
