"""The tiny checkpoints are complete diffusers pipelines: stock loaders, offline, deterministic."""
import json

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline

from tiny_models import CLIP_MAX_LENGTH, build_clip_tokenizer, build_t5_tokenizer, save_tiny_pipelines

PIPELINES = {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}
PROMPT = "a photo of a cat on the beach at sunset, highly detailed"


def _generate(pipe, seed, prompt=PROMPT, steps=2):
    """One 256x256 image as a float array, from a seeded CPU generator."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(prompt, height=256, width=256, num_inference_steps=steps, generator=generator, output_type="np").images


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_stock_pipeline_loads_and_generates_deterministically(tiny_ckpts, kind):
    pipe = PIPELINES[kind].from_pretrained(tiny_ckpts[kind])
    assert type(pipe) is PIPELINES[kind]
    first, again, other = _generate(pipe, 0), _generate(pipe, 0), _generate(pipe, 1)
    assert first.shape == (1, 256, 256, 3)
    assert np.isfinite(first).all()
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 1e-3


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_pipeline_components_match_the_real_topology(tiny_ckpts, kind):
    pipe = PIPELINES[kind].from_pretrained(tiny_ckpts[kind])
    vae = pipe.vae.config
    assert len(vae.block_out_channels) == 4 and vae.latent_channels == 16
    assert not vae.use_quant_conv and not vae.use_post_quant_conv
    expected = {"sd3": (1.5305, 0.0609), "flux": (0.3611, 0.1159)}[kind]
    assert (vae.scaling_factor, vae.shift_factor) == expected
    if kind == "flux":
        assert pipe.transformer.config.guidance_embeds


def test_build_is_deterministic(tmp_path):
    a = save_tiny_pipelines(tmp_path / "a")
    b = save_tiny_pipelines(tmp_path / "b")
    for kind in ("sd3", "flux"):
        files = sorted(p.relative_to(a[kind]) for p in a[kind].rglob("*") if p.is_file())
        assert files == sorted(p.relative_to(b[kind]) for p in b[kind].rglob("*") if p.is_file())
        for f in files:
            assert (a[kind] / f).read_bytes() == (b[kind] / f).read_bytes(), f
        size = sum((a[kind] / f).stat().st_size for f in files)
        assert size < 8 * 2**20, f"tiny-{kind} is {size / 2**20:.1f} MB"
        assert json.loads((a[kind] / "TINY_RANDOM_WEIGHTS.json").read_text())["kind"] == kind


def test_tokenizers_truncate_prompts_longer_than_their_maximum():
    long_prompt = " ".join(["a beautiful photo of a golden mountain lake"] * 80)
    clip, t5 = build_clip_tokenizer(), build_t5_tokenizer()
    assert len(clip(long_prompt).input_ids) > CLIP_MAX_LENGTH
    ids = clip(long_prompt, padding="max_length", truncation=True, max_length=CLIP_MAX_LENGTH).input_ids
    assert len(ids) == CLIP_MAX_LENGTH and ids[0] == clip.bos_token_id and ids[-1] == clip.eos_token_id
    ids = t5(long_prompt, padding="max_length", truncation=True, max_length=256).input_ids
    assert len(ids) == 256 and ids[-1] == t5.eos_token_id
    # Unknown words fall back to bytes instead of becoming unknown tokens (CLIP's unk is its eos).
    assert clip.unk_token_id not in clip("zebra quokka").input_ids[1:-1]


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_pipelines_run_a_prompt_longer_than_the_tokenizers(tiny_ckpts, kind):
    pipe = PIPELINES[kind].from_pretrained(tiny_ckpts[kind])
    image = _generate(pipe, 0, prompt=" ".join(["a detailed red castle under clouds"] * 120), steps=1)
    assert np.isfinite(image).all()


def test_the_real_width_flux_has_flux_dev_widths_random_norm_scales_and_shards(real_width_flux):
    from exporting.tensor_files import SafetensorsFolder

    config = json.loads((real_width_flux / "transformer" / "config.json").read_text())
    assert {k: config[k] for k in ("attention_head_dim", "num_attention_heads", "joint_attention_dim",
                                   "pooled_projection_dim", "in_channels", "guidance_embeds")} == {
        "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
        "pooled_projection_dim": 768, "in_channels": 64, "guidance_embeds": True}  # FLUX.1-dev's config.json
    assert tuple(config["axes_dims_rope"]) == (16, 56, 56) and (config["num_layers"], config["num_single_layers"]) == (1, 1)
    index = json.loads((real_width_flux / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded, as save_pretrained writes a large model
    tensors = SafetensorsFolder(real_width_flux / "transformer")
    assert set(tensors.dtypes.values()) == {torch.bfloat16}
    assert 0.5e9 < sum(np.prod(shape) for shape in tensors.shapes.values()) < 0.6e9
    scale = tensors.read("transformer_blocks.0.attn.norm_q.weight").float()
    assert scale.std() > 0.05 and not torch.equal(scale, tensors.read("transformer_blocks.0.attn.norm_k.weight").float())
