"""One SD3 WLF training step (training.py's loss, models.py's SD3 transformer call, AdamW): seconds per step, images/s,
peak memory (over all cases) and MFU. On a GPU: SD3-medium size (PROTOCOL.md §11, random weights), 4096², batch 1, bf16
autocast, gradient checkpointing. --smoke: the tiny model on the CPU at 256². Reference in the same run: plain MSE.

    python -m bench.bench_train_step            # needs a CUDA GPU (target: >= 0.59 images/s on one H100)
    python -m bench.bench_train_step --smoke    # CPU, tiny model: checks the path, says nothing about 4K speed
"""
import argparse
import json
import resource
import statistics
import time

import diffusers
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

import accelerated
import training
from bench.bench_generation import SD3_MEDIUM, full_size_vae
from bench.flops import image_tokens, peak_flops, sd3_transformer_flops
from errors import HelpFormatter, UsageError, exit_on_usage_error
from models import MODELS
from partitioned_vae import make_f16_vae
from tiny_models import build_tiny_sd3_pipeline

TEXT_TOKENS = 77 + 77  # CLIP 77 + the authors' T5 length 77
PAPER_IMAGES_PER_SECOND = 0.59  # Table 10: SD3-2B at 4096² on 2x A800-80G


def build_models(smoke, device):
    """(transformer, F=16 VAE): tiny ones for --smoke, else SD3-medium size with random weights."""
    if smoke:
        pipe = build_tiny_sd3_pipeline()
        transformer, vae = pipe.transformer, pipe.vae
    else:
        torch.manual_seed(0)
        transformer, vae = SD3Transformer2DModel(**SD3_MEDIUM), full_size_vae("sd3")
    make_f16_vae(vae)
    return transformer.to(device).train(), vae.to(device, torch.bfloat16 if device.type == "cuda" else torch.float32)


def timed_step(transformer, vae, optimizer, scheduler, objective, batch, step, device):
    """Seconds of one optimiser step: training.training_loss (SD3's transformer call), backward, clip, AdamW."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    generator = accelerated.step_generator(0, step, 0, 0, device)
    sd3 = MODELS["sd3"]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = training.training_loss(transformer, sd3.predict, batch, vae, scheduler, training.build_loss(objective),
                                      generator, torch.float32, training.LossSettings(sd3.train_weighting_scheme))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)  # the trainer's --max_grad_norm
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def peak_memory_gib(device):
    """Peak GPU memory allocated by torch, or the process's peak RSS on the CPU, in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main(args):
    diffusers.utils.logging.set_verbosity_error()
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("No CUDA GPU: run with --smoke for the CPU path (tiny model), or on a GPU machine.")
    if args.smoke:
        torch.set_num_threads(args.threads)
    resolution = args.resolution or (256 if args.smoke else 4096)
    transformer, vae = build_models(args.smoke, device)
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    config = dict(transformer.config)
    pooled, joint = config["pooled_projection_dim"], config["joint_attention_dim"]
    embeddings = {"prompt_embeds": torch.randn(args.batch, TEXT_TOKENS, joint, device=device),
                  "pooled_prompt_embeds": torch.randn(args.batch, pooled, device=device)}
    pixels = torch.rand(args.batch, 3, resolution, resolution, device=device) * 2 - 1
    with torch.no_grad():
        latent_dist = vae.encode(pixels.to(vae.dtype)).latent_dist.parameters
    forward_flops = sd3_transformer_flops(config, image_tokens(resolution, resolution), TEXT_TOKENS, args.batch)
    peak = peak_flops(torch.cuda.get_device_name()) if device.type == "cuda" else None
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    cases = {"wlf, cached latents": ("wlf", {"latent_dist": latent_dist, **embeddings}),
             "mse, cached latents": ("mse", {"latent_dist": latent_dist, **embeddings}),
             "wlf, VAE encode in the step": ("wlf", {"pixels": pixels, **embeddings})}
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=1e-6, weight_decay=1e-4)  # the paper's AdamW
    # Rounds of one step per case, the first one a warm-up: a machine's load drifts alike over every case.
    times = {name: [] for name in cases}
    for step in range(args.steps + 1):
        for name, (objective, batch) in cases.items():
            seconds = timed_step(transformer, vae, optimizer, scheduler, objective, batch, step, device)
            times[name].append(seconds)
    results = {}
    for name in cases:
        seconds = results[name] = statistics.median(times[name][1:])
        images_per_second = args.batch / seconds
        print(json.dumps({
            "case": name, "device": device_name, "resolution": resolution, "batch": args.batch,
            "gradient_checkpointing": args.gradient_checkpointing,
            "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
            "params": sum(p.numel() for p in transformer.parameters()), "seconds_per_step": round(seconds, 4),
            "images_per_second": round(images_per_second, 4), "peak_memory_gib": round(peak_memory_gib(device), 3),
            "model_flops_per_image": float(f"{3 * forward_flops / args.batch:.4g}"),
            "mfu": round(3 * forward_flops / seconds / peak, 4) if peak else None,
            "hfu_with_recompute": (round(4 * forward_flops / seconds / peak, 4)
                                   if peak and args.gradient_checkpointing else None),
            "achieved_flops_per_second": float(f"{3 * forward_flops / seconds:.4g}"),
            "vs_paper_0.59_images_per_s": None if args.smoke else round(images_per_second / PAPER_IMAGES_PER_SECOND, 3),
        }))
    print(json.dumps({"reference": "mse, cached latents",
                      "wlf_over_mse_step_time": round(results["wlf, cached latents"]
                                                      / results["mse, cached latents"], 4),
                      "vae_encode_over_cached_step_time": round(results["wlf, VAE encode in the step"]
                                                                / results["wlf, cached latents"], 4)}))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny SD3 on the CPU (no GPU needed)")
    parser.add_argument("--resolution", type=int, default=None, help="default 4096 (GPU) / 256 (--smoke)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per case after one warm-up round")
    parser.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for --smoke")
    return parser.parse_args(argv)


if __name__ == "__main__":
    exit_on_usage_error("python -m bench.bench_train_step", main, parse_args())
