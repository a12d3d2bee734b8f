"""VAE reconstruction: x_hat = decode(encode(x)) in every VAE mode, its pixel metrics, and LPIPS from local weights.

Shared by eval_vae.py (paper Table 2) and train_sc_vae.py (its loss and validation). Pixels are in [0, 1]:
    NMSE  = |x - x_hat|^2 / |x|^2       NRMSE = |x - x_hat| / |x|       PSNR = 10 log10(1 / MSE)
    SSIM  = Wang et al.'s Gaussian-window SSIM (sigma 1.5, 11 taps, population covariances), per channel,
            averaged over the pixels at least 5 from the border (scikit-image's `structural_similarity` definition)
    LPIPS = Zhang et al. (2018) through the `lpips` package (the authors' choice), inputs in [-1, 1]
"""
import inspect
import pickle
import warnings
import zipfile
from pathlib import Path

import lpips
import torch
from accelerate import init_empty_weights
import torch.nn.functional as F
from torchmetrics.functional.image import structural_similarity_index_measure

from errors import UsageError
from partitioned_vae import VAE_MODES, vae_factor

SSIM_SIGMA, SSIM_RADIUS = 1.5, 5  # scikit-image's Gaussian window: radius int(3.5 sigma + 0.5), 11 taps
# torchvision's ImageNet backbones that LPIPS v0.1 was calibrated on (nothing is downloaded at run time).
LPIPS_BACKBONES = {
    "alex": "torchvision's AlexNet weights alexnet-owt-7be5be79.pth from "
            "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    "vgg": "torchvision's VGG16 weights vgg16-397923af.pth from https://download.pytorch.org/models/vgg16-397923af.pth",
}


#################################################################################
#                                   VAE modes                                   #
#################################################################################

@torch.no_grad()
def vae_round_trip(vae, x):
    """decode(posterior mean of encode(x)) clamped, for x in [0, 1] (B, 3, H, W); returns [0, 1] in x's dtype."""
    sample = (2 * x - 1).to(vae.dtype)
    decoded = vae.decode(vae.encode(sample).latent_dist.mean).sample
    return ((decoded.float().clamp(-1, 1) + 1) / 2).to(x.dtype)


def reconstruct(vae, x, mode):
    """The reconstruction of x in [0, 1] by a VAE loaded with `partitioned_vae.load_vae(..., mode)`.

    A mode whose factor is twice the VAE's (f8_half: the stock VAE at F=16): the image shrunk by 2 (bilinear,
    antialiased), the round trip, enlarged back (bicubic) and clamped.
    """
    if VAE_MODES[mode].factor == vae_factor(vae):
        return vae_round_trip(vae, x)
    small = F.interpolate(x, scale_factor=0.5, mode="bilinear", antialias=True, align_corners=False)
    return F.interpolate(vae_round_trip(vae, small), size=x.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)


#################################################################################
#                                 Pixel metrics                                 #
#################################################################################

def ssim(x, y, strip=256):
    """Per-image SSIM of (B, C, H, W) images in [0, 1] (scikit-image's Gaussian form, borders of 5 pixels left out).

    torchmetrics' SSIM map, computed on strips of `strip` rows each read with a 5-row halo (the window's reach), so
    a 4096^2 image never needs more than one strip's filter buffers; the strips' interiors tile the image exactly.
    """
    r, (h, w) = SSIM_RADIUS, x.shape[-2:]
    if min(h, w) <= 2 * r:
        raise ValueError(f"SSIM needs images larger than {2 * r + 1} pixels a side, got {tuple(x.shape)}.")
    total = x.new_zeros(x.shape[0], dtype=torch.float64)
    for r0 in range(r, h - r, strip):
        r1 = min(r0 + strip, h - r)
        _, full = structural_similarity_index_measure(y[..., r0 - r:r1 + r, :], x[..., r0 - r:r1 + r, :],
                                                      gaussian_kernel=True, sigma=SSIM_SIGMA, data_range=1.0,
                                                      reduction="none", return_full_image=True)
        total += full[..., r:-r, r:-r].double().sum(dim=(1, 2, 3))
    return total / (x.shape[1] * (h - 2 * r) * (w - 2 * r))


def pixel_metrics(x, x_hat, names=("nmse", "nrmse", "psnr", "ssim")):
    """{name: tensor (B,)} of the pixel metrics named, for originals x and reconstructions x_hat in [0, 1]."""
    error = (x.double() - x_hat.double()).pow(2).flatten(1).sum(1)
    energy = x.double().pow(2).flatten(1).sum(1)
    mse = error / x[0].numel()
    values = {}
    if "nmse" in names:
        values["nmse"] = error / energy
    if "nrmse" in names:
        values["nrmse"] = (error / energy).sqrt()
    if "psnr" in names:
        values["psnr"] = 10 * torch.log10(1 / mse)
    if "ssim" in names:
        values["ssim"] = ssim(x.float(), x_hat.float())  # fp32: within 1e-5 of scikit-image's fp64
    return values


#################################################################################
#                                     LPIPS                                     #
#################################################################################

def lpips_heads_file(net):
    """The LPIPS v0.1 linear heads the `lpips` package ships for `net` (its calibration on human judgements)."""
    return Path(inspect.getfile(lpips.LPIPS)).parent / "weights" / "v0.1" / f"{net}.pth"


def backbone_state_dict(metric, backbone):
    """torchvision's `features.N.*` keys of an ImageNet backbone renamed to the LPIPS module's `net.sliceK.N.*`."""
    where = {index: f"net.{name}.{index}" for name, block in metric.net.named_children() for index in block._modules}
    return {f"{where[key.split('.')[1]]}.{key.split('.', 2)[2]}": value for key, value in backbone.items()
            if key.startswith("features.") and key.split(".")[1] in where}


def load_lpips(net, backbone_file, heads_file=None, device="cpu"):
    """LPIPS (`net` alex or vgg) with the ImageNet backbone and linear heads read from local files; frozen, eval mode.

    heads_file None: the heads the `lpips` package ships. Raises UsageError naming a missing or wrong file.
    """
    flag = "--lpips_backbone"
    if backbone_file is None or not Path(backbone_file).is_file():
        given = "is required" if backbone_file is None else f"{backbone_file} is not a file"
        raise UsageError(f"{flag} {given}: LPIPS-{net} needs {LPIPS_BACKBONES[net]} (nothing is downloaded).")
    heads_file = Path(heads_file or lpips_heads_file(net))
    if not heads_file.is_file():
        raise UsageError(f"--lpips_heads {heads_file} is not a file: use the {net}.pth of the lpips package "
                         f"(lpips/weights/v0.1/{net}.pth, `pip install lpips`).")
    # Built without initialising weights (the files give them all; AlexNet's random init alone takes seconds).
    with warnings.catch_warnings(), init_empty_weights():  # lpips still passes torchvision `pretrained=False`
        warnings.simplefilter("ignore", UserWarning)
        metric = lpips.LPIPS(net=net, pretrained=False, pnet_rand=True, verbose=False)
    try:
        backbone = torch.load(backbone_file, map_location="cpu", weights_only=True)
        heads = torch.load(heads_file, map_location="cpu", weights_only=True)
        weights = {**backbone_state_dict(metric, backbone), **{k: v for k, v in heads.items() if k.startswith("lin")}}
        # lins.K is the same module as linK; the scaling layer's constants are buffers of the code, not of the files.
        missing = [k for k in metric.state_dict() if k not in weights and not k.startswith(("lins.", "scaling_layer"))]
        if missing:
            raise KeyError(f"no value for {', '.join(missing[:3])}")
        metric.load_state_dict(weights, strict=False, assign=True)
    except (RuntimeError, KeyError, TypeError, AttributeError, EOFError, pickle.UnpicklingError,
            zipfile.BadZipFile) as error:
        raise UsageError(f"{flag} {backbone_file} / --lpips_heads {heads_file} are not LPIPS-{net} weights "
                         f"({' '.join(str(error).split())[:200]}); get {LPIPS_BACKBONES[net]}.") from None
    return metric.eval().requires_grad_(False).to(device)


def add_lpips_flags(parser, net):
    """--lpips_net (default `net`), --lpips_backbone and --lpips_heads: the local files load_lpips reads."""
    parser.add_argument("--lpips_net", choices=tuple(LPIPS_BACKBONES), default=net,
                        help="LPIPS backbone: alex (the usual choice for reporting) or vgg (the authors' SC-VAE loss)")
    parser.add_argument("--lpips_backbone", default=None, help="torchvision ImageNet weights of --lpips_net "
                        "(alexnet-owt-7be5be79.pth / vgg16-397923af.pth)")
    parser.add_argument("--lpips_heads", default=None, help="LPIPS v0.1 linear heads (default: the lpips package's)")


def lpips_distance(metric, x, x_hat):
    """Per-image LPIPS (B,) of images in [0, 1] (the network sees [-1, 1])."""
    return metric(2 * x - 1, 2 * x_hat - 1).flatten()
