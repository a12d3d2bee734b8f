"""low_memory.py: each memory saving gives the plain run's image (or a stated tolerance), or a clear error on the CPU."""
import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline

import low_memory
from errors import UsageError
from partitioned_vae import use_f16_vae

PIPELINES = {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}
PROMPT = "a photo of a red castle"


def load(kind, ckpt, quantize="none", dtype=torch.float32):
    """The stock tiny pipeline with the F=16 VAE, optionally quantised by torchao as it loads."""
    pipe = PIPELINES[kind].from_pretrained(ckpt, torch_dtype=dtype,
                                           quantization_config=low_memory.quantization_config(quantize))
    pipe.set_progress_bar_config(disable=True)
    return use_f16_vae(pipe)


def image(pipe, size=64):
    """A size x size image of PROMPT in 2 steps, seed 0, as a float array in [0, 1]."""
    return pipe(PROMPT, height=size, width=size, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                output_type="np").images[0]


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_cpu_modes_give_the_plain_image(tiny_ckpts, kind):
    plain = image(load(kind, tiny_ckpts[kind]))
    # Group offloading only moves weights (here CPU -> CPU through the same hooks as on a GPU): the same numbers.
    group = low_memory.apply_low_memory(load(kind, tiny_ckpts[kind]), "cpu", cpu_offload="group")
    assert getattr(group.transformer, "_diffusers_hook", None) is not None
    np.testing.assert_array_equal(image(group), plain)
    # fp8 storage rounds every cast weight to 3 mantissa bits; int8 weight-only to 255 levels per row: the image
    # moves by a few 1/255 steps on average (pixels in [0, 1]), and must move (the weights are not what they were).
    fp8 = low_memory.apply_low_memory(load(kind, tiny_ckpts[kind]), "cpu", layerwise_casting="fp8_e4m3")
    assert fp8.transformer.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    int8 = low_memory.apply_low_memory(load(kind, tiny_ckpts[kind], quantize="int8wo"), "cpu")
    assert type(int8.transformer.transformer_blocks[0].attn.to_q.weight).__name__ == "Int8Tensor"
    for pipe in (fp8, int8):
        difference = np.abs(image(pipe) - plain)
        assert 0 < difference.mean() < 0.02 and difference.max() < 0.3


def test_vae_tiling_decodes_f16_tiles(tiny_ckpts):
    pipe = load("sd3", tiny_ckpts["sd3"])
    vae = pipe.vae
    latents = torch.randn(1, 16, 32, 32, generator=torch.Generator().manual_seed(0))  # 512x512 pixels, F=16
    with torch.no_grad():
        plain = vae.decode(latents).sample
        small = vae.decode(latents[:, :, :8, :8]).sample
        low_memory.apply_low_memory(pipe, "cpu", vae_tiling=True)
        assert vae.use_tiling and vae.tile_latent_min_size * 16 == vae.tile_sample_min_size == 256
        tiled = vae.decode(latents).sample
        torch.testing.assert_close(vae.decode(latents[:, :, :8, :8]).sample, small)  # below one tile: no tiling
        first_tile = vae.decoder(latents[:, :, :16, :16])  # a 16x16 latent tile decodes to 256x256 pixels
    assert tiled.shape == plain.shape == (1, 3, 512, 512)
    keep = vae.tile_sample_min_size - int(vae.tile_sample_min_size * vae.tile_overlap_factor)
    torch.testing.assert_close(tiled[..., :keep, :keep], first_tile[..., :keep, :keep])
    # Elsewhere tiles overlap by a quarter and are blended linearly: the seams differ from the one-pass decode,
    # which sees the whole latent (on random weights by up to a large part of the range, on average a little).
    assert (tiled - plain).abs().mean() < 0.15


def test_what_needs_a_gpu_or_contradicts_fails_naming_the_flag():
    with pytest.raises(UsageError, match="--quantize float8dq needs a CUDA GPU"):
        low_memory.check_low_memory("cpu", quantize="float8dq")
    with pytest.raises(UsageError, match="--quantize float8wo needs a CUDA GPU"):
        low_memory.check_low_memory("cpu", quantize="float8wo")
    with pytest.raises(UsageError, match="--quantize and --layerwise_casting"):
        low_memory.check_low_memory("cpu", quantize="int8wo", layerwise_casting="fp8_e4m3")
    with pytest.raises(UsageError, match="--compile .*--cpu_offload sequential"):
        low_memory.check_low_memory("cpu", cpu_offload="sequential", compile=True)
    with pytest.raises(UsageError, match="--cpu_offload 'disk'"):
        low_memory.check_low_memory("cpu", cpu_offload="disk")
    low_memory.check_low_memory("cpu", "group", "fp8_e4m3", "none", True)  # fine on the CPU
    low_memory.check_low_memory("cpu", quantize="int8wo")
    assert low_memory.quantization_config("none") is None


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_compiled_transformer_gives_the_plain_image(tiny_ckpts, kind):
    # inductor's fused kernels reorder float sums: equal to float32 rounding, not bit for bit (about 2 min cold).
    plain = image(load(kind, tiny_ckpts[kind]))
    compiled = low_memory.apply_low_memory(load(kind, tiny_ckpts[kind]), "cpu", compile=True)
    np.testing.assert_allclose(image(compiled), plain, atol=1e-4)
