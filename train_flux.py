"""WLF fine-tuning of the FLUX.1-dev transformer at 4K (SPEC §4); the shared logic lives in training.py.

    accelerate launch --config_file ds_config.yaml train_flux.py --pretrained_model_name_or_path ... (see train_flux.sh)
"""
from functools import partial

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel

import training
from generation import DEFAULTS

VAE_FACTOR = 16  # the F=16 partitioned VAE: an h x w latent is a 16h x 16w image


def encode_prompts(pipe, prompts, max_sequence_length):
    """T5 sequence embeddings and the pooled CLIP-L embedding, as FluxPipeline.encode_prompt makes them."""
    prompt_embeds, pooled_prompt_embeds, _ = pipe.encode_prompt(prompts, None, max_sequence_length=max_sequence_length)
    return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled_prompt_embeds}


def predict(transformer, noisy_latents, timesteps, embeddings, guidance_scale=None):
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


def validation_kwargs(embeddings, negative_embeddings):
    """Pipeline arguments for validation images: cached embeddings, SPEC §5 settings (FLUX.1-dev has no negative)."""
    return {"prompt_embeds": embeddings["prompt_embeds"], "pooled_prompt_embeds": embeddings["pooled_prompt_embeds"],
            "num_inference_steps": DEFAULTS["flux"]["num_inference_steps"],
            "guidance_scale": DEFAULTS["flux"]["guidance_scale"]}


def main(args):
    config = FluxTransformer2DModel.load_config(args.pretrained_model_name_or_path, subfolder="transformer")
    guidance = args.guidance_scale if config.get("guidance_embeds") else None  # FLUX.1-dev: on; schnell: none
    return training.train(args, FluxPipeline, FluxTransformer2DModel, encode_prompts,
                          partial(predict, guidance_scale=guidance), validation_kwargs)


def parse_args(argv=None):
    """The shared flags of training.build_parser, FLUX.1-dev's T5 length (512) and its training guidance (3.5)."""
    parser = training.build_parser(__doc__, max_sequence_length=512)
    parser.add_argument("--guidance_scale", type=float, default=3.5, help="guidance embedding value while training")
    return parser.parse_args(argv)


if __name__ == "__main__":
    training.run(main, parse_args())
