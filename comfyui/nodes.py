"""The F=16 VAE in ComfyUI: decode and encode through the VAE object ComfyUI loaded, turned F=16 for the call by
partitioned_vae.convert_to_f16 (the code every script of the repository uses), and the empty F=16 latent."""
from contextlib import contextmanager

import torch

from .project import import_from_repository

partitioned_vae = import_from_repository("partitioned_vae")

FACTOR = 16
LATENT_CHANNELS = 16  # SD3's and Flux's VAE
MAX_RESOLUTION = 16384  # ComfyUI's nodes.MAX_RESOLUTION
CATEGORY = "latent/Diffusion-4K"


@contextmanager
def f16_vae(vae, mode="partitioned", grid=2):
    """ComfyUI's VAE object as the F=16 VAE for the duration of a call: its first_stage_model's encoder.conv_in
    strided and decoder.conv_out partitioned in `mode`, downscale_ratio and upscale_ratio 16, the decode memory
    estimate 4x (twice the pixels a side per latent). Restored afterwards, so stock nodes given the same VAE still
    see the VAE they loaded."""
    model = vae.first_stage_model
    channels = getattr(vae, "latent_channels", LATENT_CHANNELS)
    if channels != LATENT_CHANNELS:
        raise ValueError(f"The F=16 nodes take SD3's or Flux's VAE (16 latent channels); this VAE has {channels}.")
    saved = (model.encoder.conv_in, model.encoder.conv_in.stride, model.decoder.conv_out, vae.downscale_ratio,
             vae.upscale_ratio, vae.memory_used_decode)
    partitioned_vae.convert_to_f16(model.encoder, model.decoder, mode, grid)
    vae.downscale_ratio = vae.upscale_ratio = FACTOR
    vae.memory_used_decode = lambda shape, dtype: 4 * saved[5](shape, dtype)
    try:
        yield vae
    finally:
        saved[0].stride = saved[1]
        model.decoder.conv_out = saved[2]
        vae.downscale_ratio, vae.upscale_ratio, vae.memory_used_decode = saved[3:]


class VAEDecodeF16:
    """Latents (B, 16, H/16, W/16) -> images (B, H, W, 3) in [0, 1] through the F=16 decoder."""
    DESCRIPTION = ("Decodes an F=16 latent (4096x4096 from 256x256) with SD3's or Flux's VAE as Diffusion-4K does. "
                   "mode: partitioned, subpixel and full give the same image; authors is the crop of the authors' "
                   "code, which their SC-VAE checkpoint flux_wavelet_v2_sc was trained under.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "vae": ("VAE",),
                             "mode": (list(partitioned_vae.DECODE_MODES), {"default": "partitioned"}),
                             "grid": ("INT", {"default": 2, "min": 1, "max": 64,
                                              "tooltip": "tiles per side of the last layer (partitioned)"})}}

    def decode(self, samples, vae, mode, grid):
        with f16_vae(vae, mode, grid):
            return (vae.decode(samples["samples"]),)


class VAEEncodeF16:
    """Images (B, H, W, C) in [0, 1] -> latents (B, 16, H/16, W/16) through the F=16 encoder (stride-2 conv_in)."""
    DESCRIPTION = "Encodes an image into an F=16 latent with SD3's or Flux's VAE as Diffusion-4K does."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"pixels": ("IMAGE",), "vae": ("VAE",)}}

    def encode(self, pixels, vae):
        with f16_vae(vae):
            return ({"samples": vae.encode(pixels[:, :, :, :3])},)


class EmptyLatentF16:
    """Zeros of shape (batch_size, 16, height/16, width/16), as ComfyUI's empty SD3 latent at F=8."""
    DESCRIPTION = "An empty F=16 latent for SD3 or Flux: 4096x4096 is a 256x256 latent."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "generate"

    @classmethod
    def INPUT_TYPES(cls):
        size = {"default": 4096, "min": partitioned_vae.SIZE_MULTIPLE, "max": MAX_RESOLUTION,
                "step": partitioned_vae.SIZE_MULTIPLE}
        return {"required": {"width": ("INT", dict(size)), "height": ("INT", dict(size)),
                             "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096})}}

    def generate(self, width, height, batch_size=1):
        partitioned_vae.check_size(height, width)
        return ({"samples": torch.zeros(batch_size, LATENT_CHANNELS, height // FACTOR, width // FACTOR)},)
