"""WLF fine-tuning of the Stable Diffusion 3 transformer at 4K (SPEC §4); the shared logic lives in training.py.

    accelerate launch --config_file ds_config.yaml train_sd3.py --pretrained_model_name_or_path ... (see train_sd3.sh)
"""
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

import training
from generation import DEFAULTS


def encode_prompts(pipe, prompts, max_sequence_length):
    """CLIP-L + CLIP-G + T5 embeddings, as StableDiffusion3Pipeline.encode_prompt makes them (no CFG copy)."""
    prompt_embeds, _, pooled_prompt_embeds, _ = pipe.encode_prompt(
        prompts, None, None, do_classifier_free_guidance=False, max_sequence_length=max_sequence_length)
    return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled_prompt_embeds}


def predict(transformer, noisy_latents, timesteps, embeddings):
    """The SD3 transformer's output for (B, 16, h, w) latents; SD3 takes timesteps in [0, 1000]."""
    return transformer(hidden_states=noisy_latents, timestep=timesteps,
                       encoder_hidden_states=embeddings["prompt_embeds"],
                       pooled_projections=embeddings["pooled_prompt_embeds"], return_dict=False)[0]


def validation_kwargs(embeddings, negative_embeddings):
    """Pipeline arguments for validation images: cached embeddings, negative prompt "", SPEC §5 settings."""
    return {"prompt_embeds": embeddings["prompt_embeds"], "pooled_prompt_embeds": embeddings["pooled_prompt_embeds"],
            "negative_prompt_embeds": negative_embeddings["prompt_embeds"],
            "negative_pooled_prompt_embeds": negative_embeddings["pooled_prompt_embeds"],
            "num_inference_steps": DEFAULTS["sd3"]["num_inference_steps"],
            "guidance_scale": DEFAULTS["sd3"]["guidance_scale"]}


def main(args):
    return training.train(args, StableDiffusion3Pipeline, SD3Transformer2DModel, encode_prompts, predict,
                          validation_kwargs)


def parse_args(argv=None):
    """The shared flags of training.build_parser, with the authors' SD3 T5 length (77)."""
    return training.build_parser(__doc__, max_sequence_length=77).parse_args(argv)


if __name__ == "__main__":
    training.run(main, parse_args())
