"""Partitioned VAE: an F=16 AutoencoderKL built from pretrained F=8 weights, none of them changed (PROTOCOL.md §2).

Encoder: `conv_in` runs with stride 2. Decoder: everything runs as pretrained up to the last conv, which is
applied after nearest 2x up-sampling, in one of three exact forms:
    full         conv(up2(x))                          one pass, builds the C x H x W hidden map
    partitioned  the same, tile by tile on a G x G grid, each tile read with a one-pixel halo at low resolution
    subpixel     pixel_shuffle(conv(x, K)), K = the 4 phase kernels of the pretrained 3x3 conv, no H x W map
or as the authors' partitioned decoder computes it:
    authors      conv(up2(x)) one pixel down and right, out[i, j] = full[i-1, j-1], tile by tile (their crop
                 offset); the decoder of their SC-VAE checkpoint flux_wavelet_v2_sc was fine-tuned under it
"""
import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.image_processor import VaeImageProcessor

from errors import UsageError


@dataclass(frozen=True)
class VaeMode:
    """One --vae_mode: the pixels a latent covers per side (of the image given), whether the F=16 VAE decodes it (a
    PartitionedConv mode of the same name; else the stock F=8 VAE), whether it is exact (the pretrained computation;
    else the authors' one-pixel crop), the tag it adds to output file names (modes giving the same image share it),
    and whether the generation scripts offer it (else only eval_vae.py's reconstructions)."""
    factor: int
    f16: bool
    exact: bool
    tag: str
    generates: bool = True


# Every script's --vae_mode choices come from this table (PROTOCOL.md §2).
VAE_MODES = {
    "f8": VaeMode(8, f16=False, exact=True, tag="-f8"),  # the stock VAE, the paper's baseline
    "f8_half": VaeMode(16, f16=False, exact=True, tag="-f8_half", generates=False),  # it on the image shrunk by 2
    "full": VaeMode(16, f16=True, exact=True, tag=""),
    "partitioned": VaeMode(16, f16=True, exact=True, tag=""),
    "subpixel": VaeMode(16, f16=True, exact=True, tag=""),
    "authors": VaeMode(16, f16=True, exact=False, tag="-authors"),  # their SC-VAE checkpoint flux_wavelet_v2_sc
}
MODES = tuple(name for name, mode in VAE_MODES.items() if mode.f16 and mode.exact)  # all give conv(up2(x))
DECODE_MODES = tuple(name for name, mode in VAE_MODES.items() if mode.f16)  # every F=16 decode (train_sc_vae.py)
GENERATION_MODES = tuple(name for name, mode in VAE_MODES.items() if mode.generates)  # test_sd3.py, test_flux.py, ...

SIZE_MULTIPLE = 32  # F=16 latents, then 2x2 patches (SD3 patch_size 2, Flux 2x2 packing)
WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.bin.index.json",
)

# For output phase p (row 2i+p) a 3x3 tap at offset d in {-1, 0, 1} reads up-sampled row 2i+p+d, i.e. low-res
# row i + floor((p+d)/2). PHASE_TAPS[p, a, t] = 1 when tap t lands on low-res offset a-1.
PHASE_TAPS = torch.tensor([
    [[1, 0, 0], [0, 1, 1], [0, 0, 0]],  # p = 0: tap 0 -> i-1; taps 1, 2 -> i
    [[0, 0, 0], [1, 1, 0], [0, 0, 1]],  # p = 1: taps 0, 1 -> i; tap 2 -> i+1
])


#################################################################################
#                          Up-sample + conv, three ways                         #
#################################################################################

def full_upsample_conv(x, weight, bias):
    """Nearest 2x up-sampling, then the 3x3 conv (padding 1): the reference computation."""
    return F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1)


def partition_tiles(h, w, grid):
    """The non-empty tiles (r0, r1, c0, c1) of a grid x grid partition of an h x w map into near-equal intervals
    (rows r0 .. r1-1, columns c0 .. c1-1; fewer tiles when grid > h or w)."""
    rows, cols = ([i * n // grid for i in range(grid + 1)] for n in (h, w))
    return [(r0, r1, c0, c1) for r0, r1 in zip(rows, rows[1:]) for c0, c1 in zip(cols, cols[1:]) if r0 < r1 and c0 < c1]


def partitioned_upsample_conv(x, weight, bias, grid=2):
    """`full_upsample_conv` computed on a grid x grid partition of the output; only one tile's hidden map exists."""
    b, _, h, w = x.shape
    out = x.new_empty(b, weight.shape[0], 2 * h, 2 * w)
    for r0, r1, c0, c1 in partition_tiles(h, w, grid):
        # Low-res rows r0-1 .. r1 (zeros outside the image) up-sample to rows 2*r0-2 .. 2*r1+1; an unpadded conv
        # gives output rows 2*r0-1 .. 2*r1, of which we keep 2*r0 .. 2*r1-1. (The authors crop one row too early.)
        tile = x[:, :, max(r0 - 1, 0):r1 + 1, max(c0 - 1, 0):c1 + 1]
        tile = F.pad(tile, (int(c0 == 0), int(c1 == w), int(r0 == 0), int(r1 == h)))
        tile = F.conv2d(F.interpolate(tile, scale_factor=2, mode="nearest"), weight, bias)
        out[:, :, 2 * r0:2 * r1, 2 * c0:2 * c1] = tile[:, :, 1:-1, 1:-1]
    return out


def authors_upsample_conv(x, weight, bias, grid=2):
    """`full_upsample_conv` moved one pixel down and right, out[i, j] = full[i-1, j-1] (zero padding above and to the
    left), computed tile by tile: the authors' partitioned decode.

    Their tiles take the one-pixel halo and keep rows 1 .. 2h of each up-sampled tile's padded conv where the exact
    crop is 2 .. 2h+1. On their 2 x 2 grid (the decoder's last map always has even sides) this is their output.
    """
    b, _, h, w = x.shape
    out = x.new_empty(b, weight.shape[0], 2 * h, 2 * w)
    for r0, r1, c0, c1 in partition_tiles(h, w, grid):
        # Low-res rows r0-1 .. r1-1 up-sample to rows 2*r0-2 .. 2*r1-1; an unpadded conv gives output rows
        # 2*r0-1 .. 2*r1-2, which land one row lower, at 2*r0 .. 2*r1-1.
        tile = x[:, :, max(r0 - 1, 0):r1, max(c0 - 1, 0):c1]
        tile = F.pad(tile, (int(c0 == 0), 0, int(r0 == 0), 0))
        out[:, :, 2 * r0:2 * r1, 2 * c0:2 * c1] = F.conv2d(F.interpolate(tile, scale_factor=2, mode="nearest"),
                                                           weight, bias)
    return out


def phase_kernels(weight, bias):
    """The 3x3 kernels (4*Cout, Cin, 3, 3) and bias (4*Cout) whose pixel_shuffle(2) equals conv after nearest 2x."""
    dtype = torch.promote_types(weight.dtype, torch.float32)  # sum the taps in fp32 at least, then round once
    taps = PHASE_TAPS.to(device=weight.device, dtype=dtype)
    kernels = torch.einsum("pak,qbl,ockl->opqcab", taps, taps, weight.to(dtype))
    kernels = kernels.reshape(-1, weight.shape[1], 3, 3).to(weight.dtype)  # channel o*4 + 2p + q, as pixel_shuffle
    return kernels, None if bias is None else bias.repeat_interleave(4)


def subpixel_upsample_conv(x, weight, bias):
    """`full_upsample_conv` as one low-resolution conv with 4*Cout channels, then pixel_shuffle (PROTOCOL.md §2)."""
    kernels, phase_bias = phase_kernels(weight, bias)  # a few thousand numbers: recomputed each call, never stale
    return F.pixel_shuffle(F.conv2d(x, kernels, phase_bias, padding=1), 2)


class PartitionedConv(nn.Conv2d):
    """The decoder's last conv applied after nearest 2x up-sampling; holds the pretrained `weight` and `bias`."""

    def __init__(self, conv, mode="partitioned", grid=2):
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, padding=conv.padding,
                         bias=conv.bias is not None, device="meta")
        self.weight, self.bias = conv.weight, conv.bias  # the same Parameters: state_dict keys and tensors unchanged
        self.set_mode(mode, grid)

    def set_mode(self, mode, grid=2):
        """Choose how the up-sample + conv is computed (the three exact MODES give the same result)."""
        if mode not in DECODE_MODES:
            raise ValueError(f"Unknown decode mode {mode!r}: choose one of {', '.join(DECODE_MODES)}.")
        if int(grid) < 1:
            raise ValueError(f"grid must be a positive number of partitions per side, got {grid}.")
        self.mode, self.grid = mode, int(grid)

    def forward(self, x):
        if self.mode == "full":
            return full_upsample_conv(x, self.weight, self.bias)
        if self.mode == "partitioned":
            return partitioned_upsample_conv(x, self.weight, self.bias, self.grid)
        if self.mode == "authors":
            return authors_upsample_conv(x, self.weight, self.bias, self.grid)
        return subpixel_upsample_conv(x, self.weight, self.bias)

    def extra_repr(self):
        return f"{super().extra_repr()}, upsample=2 (nearest), mode={self.mode}, grid={self.grid}"


#################################################################################
#                           Converting VAEs and pipelines                       #
#################################################################################

def vae_factor(vae):
    """Down-sampling factor of a VAE: 2**(blocks-1) as pretrained (8), twice that once converted (16)."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return 2 * factor if is_f16_vae(vae) else factor


def is_f16_vae(vae):
    """Whether `make_f16_vae` has been applied to this VAE object."""
    return isinstance(vae.decoder.conv_out, PartitionedConv)


def check_3x3_same(conv, name):
    """Raise unless `conv` is the 3x3, stride-1, zero-padding-1 conv the F=16 construction assumes."""
    if not (isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros"):
        raise ValueError(f"{name} must be a 3x3, stride-1, zero-padding-1 conv as in a pretrained F=8 SD3/Flux "
                         f"AutoencoderKL; got {conv}.")


def convert_to_f16(encoder, decoder, mode="partitioned", grid=2):
    """The F=16 construction on a VAE's encoder and decoder, whichever library built them (diffusers' AutoencoderKL,
    the LDM one ComfyUI loads: both name the layers `encoder.conv_in` and `decoder.conv_out`): conv_in with stride 2,
    conv_out a PartitionedConv in `mode` on the same weights. On a converted pair only the mode changes."""
    if isinstance(decoder.conv_out, PartitionedConv):
        decoder.conv_out.set_mode(mode, grid)
        return
    check_3x3_same(encoder.conv_in, "encoder.conv_in")
    check_3x3_same(decoder.conv_out, "decoder.conv_out")
    decoder.conv_out = PartitionedConv(decoder.conv_out, mode, grid)
    encoder.conv_in.stride = (2, 2)  # the authors' code; the paper's text says "dilation rate of 2"


def make_f16_vae(vae, mode="partitioned", grid=2):
    """Turn a pretrained F=8 AutoencoderKL into the F=16 one in place (no weight changes) and return it.

    `mode`: one of DECODE_MODES; "authors" only for a decoder fine-tuned under the authors' crop (their SC-VAE
    flux_wavelet_v2_sc). Calling it again on a converted VAE only switches `mode` / `grid`. The choice is recorded in the config
    (`f16_vae`), so `save_pretrained` writes the untouched weights plus that note and `load_f16_vae` restores it.
    """
    if not isinstance(vae, AutoencoderKL):
        raise TypeError(f"make_f16_vae expects a diffusers AutoencoderKL, got {type(vae).__name__}.")
    convert_to_f16(vae.encoder, vae.decoder, mode, grid)
    # diffusers' tiled encode/decode pairs image tiles of `tile_sample_min_size` with latent tiles of this size.
    tile = vae.tile_sample_min_size
    vae.tile_latent_min_size = int((tile[0] if isinstance(tile, (list, tuple)) else tile) / vae_factor(vae))
    vae.register_to_config(f16_vae={"mode": mode, "grid": int(grid)})
    return vae


def check_size(height, width):
    """Raise a UsageError naming the nearest valid sizes unless height and width are positive multiples of 32."""
    problems = []
    for name, value in (("height", height), ("width", width)):
        if int(value) != value or value <= 0:
            problems.append(f"{name} {value} must be a positive integer")
        elif value % SIZE_MULTIPLE:
            below, above = value // SIZE_MULTIPLE * SIZE_MULTIPLE, (value // SIZE_MULTIPLE + 1) * SIZE_MULTIPLE
            choices = f"{below} or {above}" if below > 0 else f"{above}"
            problems.append(f"{name} {value} is not a multiple of {SIZE_MULTIPLE}: use {choices}")
    if problems:
        raise UsageError("; ".join(problems) + " (the F=16 VAE with 2x2 latent patches needs multiples of 32).")


def use_f16_vae(pipe, mode="partitioned", grid=2):
    """Put the F=16 VAE into a stock SD3 / Flux pipeline and fix `vae_scale_factor` and its image processors.

    SD3: vae_scale_factor 16, VaeImageProcessor(16). Flux packs 2x2 latents: vae_scale_factor 16,
    VaeImageProcessor(32). Each processor keeps its other settings; calling this twice changes nothing more.
    """
    if getattr(pipe, "vae", None) is None:
        raise ValueError(f"{type(pipe).__name__} has no VAE to convert: load the pipeline with its `vae`.")
    old_factor = pipe.vae_scale_factor
    make_f16_vae(pipe.vae, mode, grid)
    pipe.vae_scale_factor = vae_factor(pipe.vae)
    for name in ("image_processor", "mask_processor"):  # mask_processor: Flux fill / inpaint variants
        processor = getattr(pipe, name, None)
        if isinstance(processor, VaeImageProcessor):
            scale = processor.config.vae_scale_factor * pipe.vae_scale_factor // old_factor
            setattr(pipe, name, processor.__class__.from_config(processor.config, vae_scale_factor=scale))
    return pipe


@contextmanager
def quiet_config_warning():
    """Silence diffusers' note that the config key `f16_vae` is not an AutoencoderKL argument (it is ours)."""
    config_logger = logging.getLogger("diffusers.configuration_utils")
    level = config_logger.level
    config_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        config_logger.setLevel(level)


def find_vae_dir(pretrained_dir_or_pipeline_dir, subfolder="vae"):
    """The folder holding the VAE's config.json and weights: the given folder, or its `subfolder`."""
    root = Path(pretrained_dir_or_pipeline_dir)
    if not root.is_dir():
        raise FileNotFoundError(
            f"VAE folder {root} does not exist: pass a local diffusers VAE folder or pipeline folder "
            f"(e.g. a download of stabilityai/stable-diffusion-3-medium-diffusers or black-forest-labs/FLUX.1-dev).")
    candidates = ([root / subfolder] if subfolder else []) + [root]
    for vae_dir in candidates:
        if (vae_dir / "config.json").is_file():
            if not any((vae_dir / name).is_file() for name in WEIGHT_FILES):
                raise FileNotFoundError(
                    f"{vae_dir} has a config.json but no VAE weights: expected {WEIGHT_FILES[0]} "
                    f"(or {', '.join(WEIGHT_FILES[1:])}). Download the VAE weights into that folder.")
            return vae_dir
    raise FileNotFoundError(
        f"No VAE config.json in {' or '.join(str(c) for c in candidates)}: pass a diffusers VAE folder or a pipeline "
        f"folder with a '{subfolder}' subfolder.")


def load_vae(path, mode=None, grid=None, torch_dtype=None, flag="--vae"):
    """The one VAE loader of the scripts: the AutoencoderKL of a VAE folder or pipeline folder (its vae/), the stock
    F=8 one for an F=8 --vae_mode (VAE_MODES: f8, f8_half), else F=16 decoding in `mode` on `grid` (load_f16_vae:
    None takes what a saved F=16 VAE recorded, else partitioned, 2). A missing file is a UsageError naming `flag`."""
    try:
        if mode is not None and not VAE_MODES[mode].f16:
            with quiet_config_warning():
                return AutoencoderKL.from_pretrained(find_vae_dir(path), torch_dtype=torch_dtype)
        return load_f16_vae(path, mode=mode, grid=grid, torch_dtype=torch_dtype)
    except FileNotFoundError as error:
        raise UsageError(f"{flag}: {error}") from None


def load_f16_vae(pretrained_dir_or_pipeline_dir, subfolder="vae", mode=None, grid=None, torch_dtype=None):
    """Load a diffusers AutoencoderKL from a local folder and make it F=16.

    `mode` / `grid` default to what a saved F=16 VAE recorded in its config, else "partitioned" and 2.
    """
    vae_dir = find_vae_dir(pretrained_dir_or_pipeline_dir, subfolder)
    saved = json.loads((vae_dir / "config.json").read_text()).get("f16_vae") or {}
    with quiet_config_warning():
        vae = AutoencoderKL.from_pretrained(vae_dir, torch_dtype=torch_dtype)
    return make_f16_vae(vae, mode or saved.get("mode", "partitioned"), grid or saved.get("grid", 2))
