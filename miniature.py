"""A pretrained SD3 and Flux in miniature, built in a few CPU minutes: a tiny F=8 VAE and a tiny SD3 transformer
trained on the eight scikit-image photographs, then a tiny Flux transformer on the same VAE's latents, each saved as
an ordinary diffusers pipeline folder (seeded, cached).

    python miniature.py --output_dir demo_out/miniature-sd3
    python miniature.py --model flux --vae_from demo_out/miniature-sd3 --output_dir demo_out/miniature-flux

The VAE learns to reconstruct the photos at F=8 (L1 + KL, small random crops); the transformer learns rectified
flow on the photos' F=16 latents (the VAE converted by `make_f16_vae`, no weight changed), conditioned through the
pipeline's own tiny text encoders on each photo's caption. Each transformer is called exactly as its stock pipeline
calls it (SD3: timestep 1000 sigma; Flux: 2 x 2 packed latents with their image ids, timestep sigma, guidance
embedding 3.5), written here independently of the trainer, so that the trainer's conventions can be tested against a
model that learned the pipelines' ones (tests/test_conventions.py). Fixed step counts, not time budgets: the same
machine with the same torch thread count builds the same model bit for bit; another thread count or CPU sums in
another order and builds a slightly different one (about 1 dB apart in reconstruction PSNR, README).
"""
import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.training_utils import compute_density_for_timestep_sampling
from PIL import Image

from errors import HelpFormatter, exit_on_usage_error
from partitioned_vae import make_f16_vae
from tiny_models import build_tiny_flux_pipeline, build_tiny_sd3_pipeline

# Photographs that ship with scikit-image, with captions written for them (words from tiny_models.WORDS).
PHOTOS = {
    "astronaut": "a portrait of an astronaut in a white space suit in front of an american flag",
    "coffee": "a close up photo of a cup of coffee on a saucer, top view",
    "chelsea": "a photo of an orange tabby cat looking to the side",
    "rocket": "a rocket standing on the launch pad under a blue sky",
    "hubble_deep_field": "a deep space photograph full of small bright galaxies",
    "retina": "a detailed medical photograph of a human retina with red blood vessels",
    "immunohistochemistry": "a microscope image of stained tissue with brown and blue cells",
    "coins": "a gray photograph of old coins on a dark background",
}
DEFAULTS = {"size": 128, "vae_steps": 570, "transformer_steps": 800, "seed": 0}
VAE_CROP, VAE_BATCH, VAE_HALF_FRACTION, VAE_KL_WEIGHT, VAE_LR = 32, 16, 0.3, 1e-6, 1e-3
DIT_LR = 1e-3
TIMESTEP_SHIFT = 3.0  # the pipeline's FlowMatchEulerDiscreteScheduler shift: train where the sampler spends its steps
FLUX_GUIDANCE = 3.5  # FLUX.1-dev's guidance embedding while training (the value the authors' trainer feeds)
FLUX_TEXT_LENGTH = 77  # T5 tokens per caption: the authors' Flux trainer's default
FLUX_RECIPE = 1
RECIPE = 2  # raise when the training recipe changes, so that cached miniatures are rebuilt
MARKER = "MINIATURE.json"  # written last: its presence (with matching settings) means the folder is complete


def log(msg):
    """Print a timestamped progress line."""
    print(f"[miniature {time.strftime('%H:%M:%S')}] {msg}", flush=True)


#################################################################################
#                                  Photographs                                  #
#################################################################################

def photo(name, size):
    """The scikit-image photograph `name` as an RGB PIL image, centre-cropped to a square, resized to size x size."""
    import skimage.data

    image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)


def to_tensor(images):
    """PIL images -> (N, 3, H, W) float tensor in [-1, 1]."""
    arrays = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for image in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2) / 127.5 - 1.0


def to_images(tensor):
    """(N, 3, H, W) tensor in [-1, 1] -> PIL images."""
    arrays = ((tensor.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arrays]


def psnr(a, b):
    """PSNR in dB of two RGB images (PIL, same size), peak 255."""
    mse = np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2)
    return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-12)))


def shrink_and_enlarge(image):
    """The image shrunk by 2 (area average) and enlarged back (bicubic): what one octave less resolution looks like."""
    half = image.resize((image.width // 2, image.height // 2), Image.Resampling.BOX)
    return half.resize(image.size, Image.Resampling.BICUBIC)


#################################################################################
#                                    The VAE                                    #
#################################################################################

def build_vae(seed):
    """The SD3 VAE topology in miniature (4 blocks, 16 latent channels, no quant convs), one layer per block."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 64, 64, 64), layers_per_block=1, latent_channels=16, norm_num_groups=16,
        sample_size=128, use_quant_conv=False, use_post_quant_conv=False,
    )


def vae_batch(full, half, rng):
    """VAE_BATCH random VAE_CROP crops, VAE_HALF_FRACTION of them from the photos shrunk by 2."""
    crops = []
    for _ in range(VAE_BATCH):
        source = half if rng.random() < VAE_HALF_FRACTION else full
        i = rng.integers(len(source))
        y, x = rng.integers(source.shape[-2] - VAE_CROP + 1), rng.integers(source.shape[-1] - VAE_CROP + 1)
        crops.append(source[i, :, y:y + VAE_CROP, x:x + VAE_CROP])
    return torch.stack(crops)


def train_vae(vae, photos, steps, seed):
    """Train `vae` (F=8) on random crops of `photos`: L1 reconstruction + VAE_KL_WEIGHT * KL, AdamW."""
    rng = np.random.default_rng(seed)
    half = F.interpolate(photos, scale_factor=0.5, mode="area")
    optimizer = torch.optim.AdamW(vae.parameters(), lr=VAE_LR)
    generator = torch.Generator().manual_seed(seed)
    vae.train()
    for step in range(1, steps + 1):
        x = vae_batch(photos, half, rng)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator)).sample
        loss = (recon - x).abs().mean() + VAE_KL_WEIGHT * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps:
            log(f"VAE step {step}/{steps}: loss {loss.item():.4f}")
    return vae.eval()


@torch.no_grad()
def reconstruct(vae, pixels):
    """Decode the posterior mean of `pixels`: the VAE's reconstruction."""
    return vae.decode(vae.encode(pixels).latent_dist.mode()).sample


@torch.no_grad()
def set_latent_factors(vae, photos):
    """Set shift_factor and scaling_factor so that the photos' F=8 latents have mean 0 and std 1, as SD3's are."""
    latents = vae.encode(photos).latent_dist.mode()
    shift, scale = latents.mean().item(), 1.0 / latents.std().item()
    vae.register_to_config(shift_factor=round(shift, 4), scaling_factor=round(scale, 4))


#################################################################################
#                                The transformer                                #
#################################################################################

def build_transformer(size, seed):
    """A 4-layer SD3 transformer sized for the tiny text encoders (CLIP 2 x 32, T5 64)."""
    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=size // 8, patch_size=2, in_channels=16, out_channels=16, num_layers=4,
        attention_head_dim=32, num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=128,
        pooled_projection_dim=64, pos_embed_max_size=96,
    )


@torch.no_grad()
def encode_captions(pipe, captions):
    """The pipeline's own prompt embeddings of `captions` (CLIP-L + CLIP-G + T5, no CFG copy)."""
    prompt_embeds, _, pooled, _ = pipe.encode_prompt(captions, None, None, do_classifier_free_guidance=False,
                                                     max_sequence_length=77)
    return prompt_embeds, pooled


def sd3_forward(transformer, noisy, sigma, text):
    """SD3's velocity prediction, called as StableDiffusion3Pipeline calls it: timestep = 1000 sigma."""
    prompt_embeds, pooled = text
    return transformer(hidden_states=noisy, timestep=sigma * 1000, encoder_hidden_states=prompt_embeds,
                       pooled_projections=pooled, return_dict=False)[0]


def pack(latents):
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): FluxPipeline's 2 x 2 patches, row-major, channels outermost."""
    b, c, h, w = latents.shape
    return latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, 4 * c)


def unpack(tokens, h, w):
    """The inverse of `pack` for (h, w) latents."""
    b, _, channels = tokens.shape
    return tokens.reshape(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, -1, h, w)


def flux_image_ids(h, w):
    """One (0, row, column) id per 2 x 2 patch, row-major, as FluxPipeline gives them to the rotary embedding."""
    rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()


def flux_forward(transformer, noisy, sigma, text, guidance=FLUX_GUIDANCE):
    """Flux's velocity prediction, called as FluxPipeline calls it: packed latents with their image ids, zero text
    ids, timestep = sigma (the pipeline's timestep / 1000), the guidance embedding fed `guidance`."""
    prompt_embeds, pooled = text
    b, _, h, w = noisy.shape
    out = transformer(hidden_states=pack(noisy), timestep=sigma, guidance=torch.full((b,), guidance),
                      pooled_projections=pooled, encoder_hidden_states=prompt_embeds,
                      txt_ids=torch.zeros(prompt_embeds.shape[1], 3), img_ids=flux_image_ids(h, w),
                      return_dict=False)[0]
    return unpack(out, h, w)


FORWARD = {"sd3": sd3_forward, "flux": flux_forward}


def train_transformer(transformer, forward, latent_dist, text, shift, scale, steps, seed, timestep_shift):
    """Rectified flow on the photos' latents: z_t = (1 - t) x0 + t eps, the transformer predicts eps - x0 (MSE);
    t logit-normal, then shifted as the sampler shifts it (s t / (1 + (s - 1) t)); AdamW. Each step sees every
    photo."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=DIT_LR, weight_decay=0.0)
    transformer.train()
    for step in range(1, steps + 1):
        x0 = (latent_dist.sample(generator) - shift) * scale
        noise = torch.randn(x0.shape, generator=generator)
        t = compute_density_for_timestep_sampling("logit_normal", len(x0), 0.0, 1.0, generator=generator)
        t = timestep_shift * t / (1 + (timestep_shift - 1) * t)
        sigma = t.view(-1, 1, 1, 1)
        noisy = (1 - sigma) * x0 + sigma * noise
        loss = F.mse_loss(forward(transformer, noisy, t, text), noise - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        if step % 100 == 0 or step == steps:
            log(f"transformer step {step}/{steps}: loss {loss.item():.4f}")
    return transformer.eval()


@torch.no_grad()
def heldout_loss(transformer, forward, latent_dist, text, shift, scale, sigmas, seed, target="velocity"):
    """The miniature's own flow-matching loss at the given `sigmas` (one row of noise per sigma, each photo at each):
    mean (v_hat - (eps - x0))^2, or with target="x0" mean (x0_hat - x0)^2 = sigma^2 (v_hat - v)^2, for fresh draws
    of the posterior and the noise from `seed`; the mean over the sigmas."""
    generator = torch.Generator().manual_seed(seed)
    per_sigma = []
    for sigma in sigmas.tolist():
        x0 = (latent_dist.sample(generator) - shift) * scale
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.full((len(x0),), sigma)
        noisy = (1 - sigma) * x0 + sigma * noise
        error = (forward(transformer, noisy, t, text) - (noise - x0)) ** 2
        per_sigma.append((error * (sigma ** 2 if target == "x0" else 1.0)).mean().item())
    return float(np.mean(per_sigma))


#################################################################################
#                               The whole pipeline                              #
#################################################################################

def build_settings(size, vae_steps, transformer_steps, seed):
    """What a miniature folder is built from: the recipe version and the arguments of build_miniature."""
    return {"recipe": RECIPE, "size": size, "vae_steps": vae_steps, "transformer_steps": transformer_steps,
            "seed": seed}


def is_built(output_dir, settings):
    """Whether `output_dir` holds a miniature built with exactly these settings."""
    marker = Path(output_dir) / MARKER
    return marker.is_file() and json.loads(marker.read_text()).get("settings") == settings


def save_record(output_dir, settings, vae, transformer, start):
    """Write the MARKER file (last: it marks the folder complete) and log what was built."""
    params = {"vae": sum(p.numel() for p in vae.parameters()),
              "transformer": sum(p.numel() for p in transformer.parameters())}
    record = {"settings": settings, "parameters": params, "seconds": round(time.time() - start, 1),
              "photos": PHOTOS}
    (Path(output_dir) / MARKER).write_text(json.dumps(record, indent=2) + "\n")
    log(f"saved {output_dir} ({params['vae'] / 1e6:.2f} M VAE, {params['transformer'] / 1e6:.2f} M transformer "
        f"parameters) in {record['seconds']:.0f} s")


def f16_latents(vae, size):
    """The photos' latent distribution under the F=16 VAE (a converted copy of `vae`, no weight changed)."""
    with torch.no_grad():
        return make_f16_vae(copy.deepcopy(vae)).encode(to_tensor([photo(name, size) for name in PHOTOS])).latent_dist


def build_miniature(output_dir, size, vae_steps, transformer_steps, seed):
    """Train the miniature and save it as a StableDiffusion3Pipeline folder (F=8 VAE, as SD3-medium ships);
    returns the folder. A folder already built with the same settings is kept as it is."""
    output_dir = Path(output_dir)
    settings = build_settings(size, vae_steps, transformer_steps, seed)
    if is_built(output_dir, settings):
        log(f"{output_dir} already holds this miniature: kept")
        return output_dir
    start = time.time()
    photos = to_tensor([photo(name, size) for name in PHOTOS])

    # Train the VAE at F=8:
    vae = train_vae(build_vae(seed), photos, vae_steps, seed)
    set_latent_factors(vae, photos)

    # Train the transformer on the photos' F=16 latents, conditioned on the captions through the pipeline's text
    # encoders:
    pipe = build_tiny_sd3_pipeline(seed)
    text = encode_captions(pipe, list(PHOTOS.values()))
    transformer = train_transformer(build_transformer(size, seed + 1), sd3_forward, f16_latents(vae, size), text,
                                    vae.config.shift_factor, vae.config.scaling_factor, transformer_steps, seed,
                                    TIMESTEP_SHIFT)

    # Save as an ordinary diffusers pipeline folder:
    pipe.vae, pipe.transformer = vae, transformer
    pipe.register_modules(vae=vae, transformer=transformer)
    pipe.save_pretrained(output_dir, safe_serialization=True)
    save_record(output_dir, settings, vae, transformer, start)
    return output_dir


#################################################################################
#                             The Flux miniature                                #
#################################################################################

def build_flux_transformer(seed):
    """A FLUX.1-dev transformer in miniature (2 double + 2 single blocks, guidance embedding) for the tiny Flux
    text encoders (T5 64, CLIP-L pooled 32)."""
    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2,
                                  attention_head_dim=32, num_attention_heads=4, joint_attention_dim=64,
                                  pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(8, 12, 12))


@torch.no_grad()
def encode_flux_captions(pipe, captions):
    """FluxPipeline's own prompt embeddings of `captions`: T5 sequence (FLUX_TEXT_LENGTH tokens), pooled CLIP-L."""
    prompt_embeds, pooled, _ = pipe.encode_prompt(captions, None, max_sequence_length=FLUX_TEXT_LENGTH)
    return prompt_embeds, pooled


def flux_timestep_shift(scheduler_config, size):
    """exp(mu): the shift FluxPipeline's resolution-dependent schedule gives a size x size image (F=16, 2 x 2)."""
    c = scheduler_config
    return float(np.exp(calculate_shift((size // 32) ** 2, c["base_image_seq_len"], c["max_image_seq_len"],
                                        c["base_shift"], c["max_shift"])))


def flux_settings(sd3_dir, transformer_steps, seed):
    """What a Flux miniature folder is built from: its recipe, the SD3 miniature whose VAE it shares, its steps."""
    marker = Path(sd3_dir) / MARKER
    if not marker.is_file():
        raise FileNotFoundError(f"{sd3_dir} holds no finished SD3 miniature (no {MARKER}): build it first")
    return {"recipe": FLUX_RECIPE, "vae_from": json.loads(marker.read_text())["settings"],
            "transformer_steps": transformer_steps, "seed": seed}


def build_flux_miniature(output_dir, sd3_dir, transformer_steps, seed):
    """Train a Flux transformer on the photos' F=16 latents of the SD3 miniature's VAE (the same 16-channel latent
    space, as SD3 and Flux share a VAE design) and save a FluxPipeline folder; kept if already built alike."""
    output_dir = Path(output_dir)
    settings = flux_settings(sd3_dir, transformer_steps, seed)
    if is_built(output_dir, settings):
        log(f"{output_dir} already holds this miniature: kept")
        return output_dir
    start = time.time()
    size = settings["vae_from"]["size"]
    vae = AutoencoderKL.from_pretrained(sd3_dir, subfolder="vae").eval()
    pipe = build_tiny_flux_pipeline(seed)
    text = encode_flux_captions(pipe, list(PHOTOS.values()))
    transformer = train_transformer(build_flux_transformer(seed + 1), flux_forward, f16_latents(vae, size), text,
                                    vae.config.shift_factor, vae.config.scaling_factor, transformer_steps, seed,
                                    flux_timestep_shift(pipe.scheduler.config, size))
    pipe.vae, pipe.transformer = vae, transformer
    pipe.register_modules(vae=vae, transformer=transformer)
    pipe.save_pretrained(output_dir, safe_serialization=True)
    save_record(output_dir, settings, vae, transformer, start)
    return output_dir


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model == "flux":
        build_flux_miniature(args.output_dir, args.vae_from, args.transformer_steps, args.seed)
    else:
        build_miniature(args.output_dir, args.size, args.vae_steps, args.transformer_steps, args.seed)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--output_dir", required=True, help="the pipeline folder to write (kept if already built)")
    parser.add_argument("--model", choices=["sd3", "flux"], default="sd3")
    parser.add_argument("--vae_from", default=None,
                        help="--model flux: the SD3 miniature folder whose VAE (and photo size) the Flux one shares")
    parser.add_argument("--size", type=int, default=DEFAULTS["size"], help="photo size in pixels (square)")
    parser.add_argument("--vae_steps", type=int, default=DEFAULTS["vae_steps"])
    parser.add_argument("--transformer_steps", type=int, default=DEFAULTS["transformer_steps"])
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    exit_on_usage_error("miniature.py", main, parse_args())
