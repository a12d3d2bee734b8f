"""Benchmark 4K generation: seconds per denoising step, VAE decode, peak GPU memory and MFU of SD3-medium / FLUX.1-dev.

GPU: the full-size architectures of PROTOCOL.md §11 (text encoders included) with random weights, bf16, built directly on
the GPU; 4096x4096 and 4096x3072, without and with `--cpu_offload model`.
--smoke: the tiny checkpoints on the CPU at small sizes, printing the same JSON fields, plus a meta-device build
of the full-size architectures (parameter counts) and the analytic FLOPs of a 4K step.
Each line carries its reference: the paper's Table 5 (one A100), our H100 targets, no offload for offload runs,
and the one-pass decoder for the partitioned and sub-pixel ones.
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager

import torch
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
                       SD3Transformer2DModel, StableDiffusion3Pipeline)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from bench.flops import flux_transformer_flops, image_tokens, peak_flops, sd3_transformer_flops
from errors import HelpFormatter, exit_on_usage_error
from generation import generate, load_pipeline
from models import MODELS
from partitioned_vae import MODES, use_f16_vae
from tiny_models import VAE_FACTORS, build_clip_tokenizer, build_t5_tokenizer, save_tiny_pipelines

# Short enough for the tiny CLIP tokenizer's 77 tokens (it spells unknown words byte by byte).
PROMPT = "a photo of a red castle on a mountain lake at sunset, highly detailed"
# Paper Table 5 (one A100, bf16, 4096x4096, PROTOCOL.md §5): (s/step, GB) without and with CPU offload.
PAPER_A100 = {("sd3", "none"): (1.16, 31.3), ("sd3", "model"): (1.22, 16.1),
              ("flux", "none"): (2.42, 50.4), ("flux", "model"): (3.16, 26.9)}
# Our targets on one H100 at 4096x4096: (s/step or None, GB).
H100_TARGETS = {("sd3", "none"): (0.30, 24.0), ("sd3", "model"): (None, 12.0),
                ("flux", "none"): (0.80, 40.0), ("flux", "model"): (None, 26.0)}
# Parameter counts of the released models (billions; transformers from PROTOCOL.md §11, encoders from their model cards).
SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                  num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)  # SD3-medium's transformer
REFERENCE_PARAMS_B = {"sd3.transformer": 2.0, "flux.transformer": 11.9, "t5-xxl encoder": 4.76, "clip-g": 0.69,
                      "clip-l": 0.12, "vae": 0.084}


#################################################################################
#                   Full-size architectures with random weights                 #
#################################################################################

@contextmanager
def building_on(device, dtype):
    """New modules get their parameters directly on `device` in `dtype` (no fp32 copy on the CPU first)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def clip_config(tokenizer, hidden, layers, heads, act):
    """A CLIP text-encoder config (CLIP-L: 768/12/12, OpenCLIP bigG: 1280/32/20), 77 positions, 49,408 tokens."""
    return CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                          num_attention_heads=heads, projection_dim=hidden, max_position_embeddings=77, hidden_act=act,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)


def t5_xxl_config(tokenizer):
    """The T5 v1.1 XXL encoder config (4.7 B parameters)."""
    return T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                    feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                    relative_attention_max_distance=128, pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)


def full_size_vae(kind):
    """The SD3 / Flux AutoencoderKL (PROTOCOL.md §11) with that model's latent scaling and shift."""
    scaling, shift = VAE_FACTORS[kind]
    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
                         sample_size=1024, scaling_factor=scaling, shift_factor=shift,
                         use_quant_conv=False, use_post_quant_conv=False)


def full_size_models(model, clip_tok, t5_tok):
    """Random-weight networks of SD3-medium or FLUX.1-dev (PROTOCOL.md §11), built on the current default device and dtype."""
    if model == "sd3":
        return {
            "transformer": SD3Transformer2DModel(**SD3_MEDIUM),
            "vae": full_size_vae("sd3"),
            "text_encoder": CLIPTextModelWithProjection(clip_config(clip_tok, 768, 12, 12, "quick_gelu")),
            "text_encoder_2": CLIPTextModelWithProjection(clip_config(clip_tok, 1280, 32, 20, "gelu")),
            "text_encoder_3": T5EncoderModel(t5_xxl_config(t5_tok)),
        }
    return {
        "transformer": FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56)),
        "vae": full_size_vae("flux"),
        "text_encoder": CLIPTextModel(clip_config(clip_tok, 768, 12, 12, "quick_gelu")),
        "text_encoder_2": T5EncoderModel(t5_xxl_config(t5_tok)),
    }


def full_size_pipeline(model, device, dtype=torch.bfloat16):
    """The stock SD3 / Flux pipeline around `full_size_models`, weights created on `device`, with the F=16 VAE.

    The tokenizers are the tiny offline ones: they give the real sequence lengths (77 CLIP tokens, T5 padded to
    max_sequence_length), which is all that matters for speed and memory.
    """
    clip_tok, t5_tok = build_clip_tokenizer(), build_t5_tokenizer()
    with building_on(device, dtype):
        models = full_size_models(model, clip_tok, t5_tok)
    if model == "sd3":
        pipe = StableDiffusion3Pipeline(**models, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                        tokenizer=clip_tok, tokenizer_2=build_clip_tokenizer(), tokenizer_3=t5_tok)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
        pipe = FluxPipeline(**models, scheduler=scheduler, tokenizer=clip_tok, tokenizer_2=t5_tok)
    return use_f16_vae(pipe, "partitioned", grid=2)


def parameter_counts(model):
    """Billions of parameters of each full-size network, built on the meta device (no memory, no time)."""
    with building_on("meta", torch.bfloat16):
        models = full_size_models(model, build_clip_tokenizer(), build_t5_tokenizer())
    names = {"transformer": f"{model}.transformer", "vae": "vae", "text_encoder": "clip-l",
             "text_encoder_2": "clip-g" if model == "sd3" else "t5-xxl encoder", "text_encoder_3": "t5-xxl encoder"}
    return {names[k]: sum(p.numel() for p in m.parameters()) / 1e9 for k, m in models.items()}, models["transformer"]


#################################################################################
#                                   Measuring                                   #
#################################################################################

def sig(value, digits=4):
    """`value` rounded to `digits` significant digits (None stays None)."""
    return None if value is None else float(f"{value:.{digits}g}")


def ratio(value, reference):
    """value / reference to 4 significant digits (a ratio well under 1 keeps its precision), or None when either is
    missing."""
    return None if value is None or not reference else sig(value / reference, 4)


def step_flops(model, config, height, width, guidance_scale):
    """Analytic transformer FLOPs of one denoising step (SD3 runs CFG as a batch of 2)."""
    tokens = image_tokens(height, width)
    if model == "sd3":
        return sd3_transformer_flops(config, tokens, 77 + MODELS["sd3"].inference.max_sequence_length,
                                     batch=2 if guidance_scale > 1 else 1)
    return flux_transformer_flops(config, tokens, MODELS["flux"].inference.max_sequence_length)


def time_steps(pipe, model, height, width, steps, peak, offload, baseline):
    """One generation of steps+1 steps (the first is warm-up); returns the JSON record."""
    guidance = MODELS[model].inference.guidance_scale
    _, t = generate(pipe, PROMPT, height, width, steps + 1, guidance, seed=0,
                    max_sequence_length=MODELS[model].inference.max_sequence_length)
    s_per_step = statistics.median(t["step_s"][1:])
    flops = step_flops(model, pipe.transformer.config, height, width, guidance)
    paper = PAPER_A100[model, offload] if (height, width) == (4096, 4096) else (None, None)
    target = H100_TARGETS[model, offload] if (height, width) == (4096, 4096) else (None, None)
    record = {
        "bench": "generation", "model": model, "size": f"{height}x{width}", "cpu_offload": offload,
        "steps_timed": steps, "s_per_step": round(s_per_step, 4), "first_step_s": round(t["step_s"][0], 4),
        "text_encode_s": round(t["text_encode_s"], 3), "vae_decode_s": round(t["decode_s"], 3),
        "peak_gpu_gb": sig(t["peak_gpu_gb"], 3), "peak_gpu_reserved_gb": sig(t["peak_gpu_reserved_gb"], 3),
        "step_tflop": sig(flops / 1e12), "achieved_tflops": sig(flops / s_per_step / 1e12),
        "mfu": None if peak is None else sig(flops / s_per_step / peak, 3),
        "target_s_per_step": target[0], "target_gb": target[1],
        "ratio_vs_target_s": ratio(s_per_step, target[0]), "ratio_vs_target_gb": ratio(t["peak_gpu_gb"], target[1]),
        "paper_a100_s_per_step": paper[0], "paper_a100_gb": paper[1],
        "speedup_vs_paper_a100": ratio(paper[0], s_per_step),
    }
    if baseline is not None:  # model offload against the same size without offload
        record["ratio_vs_no_offload_s"] = ratio(s_per_step, baseline["s_per_step"])
        record["ratio_vs_no_offload_gb"] = ratio(t["peak_gpu_gb"], baseline["peak_gpu_gb"])
    return record


def time_decoders(pipe, model, height, width, device, repeats):
    """VAE decode time and memory of one height x width image in each F=16 decoder mode, against 'full'.

    decode_extra_gb is the peak GPU memory above what was allocated before decoding (the weights).
    """
    latents = torch.randn(1, 16, height // 16, width // 16, generator=torch.Generator().manual_seed(0))
    latents = latents.to(device, pipe.vae.dtype)
    cuda = device.type == "cuda"
    results = {}
    for mode in ("full",) + tuple(m for m in MODES if m != "full"):
        use_f16_vae(pipe, mode, grid=2)
        with torch.no_grad():
            pipe.vae.decode(latents)  # warm-up
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            start = time.perf_counter()
            for _ in range(repeats):
                pipe.vae.decode(latents)
            if cuda:
                torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / repeats
        extra = (torch.cuda.max_memory_allocated() - before) / 1e9 if cuda else None
        results[mode] = (seconds, extra)
        yield {"bench": "vae_decode", "model": model, "size": f"{height}x{width}", "vae_mode": mode,
               "decode_s": sig(seconds), "decode_extra_gb": sig(extra, 3),
               "ratio_vs_full_s": ratio(seconds, results["full"][0]),
               "ratio_vs_full_gb": ratio(extra, results["full"][1])}
    use_f16_vae(pipe, "partitioned", grid=2)


def emit(record):
    """Print one JSON line."""
    print(json.dumps(record), flush=True)


#################################################################################
#                                      Main                                     #
#################################################################################

def main(args):
    torch.manual_seed(0)
    smoke = args.smoke or not torch.cuda.is_available()
    if smoke and not args.smoke:
        print("No GPU: running --smoke (tiny checkpoints on the CPU).", file=sys.stderr)
    device = torch.device("cpu" if smoke else "cuda")
    sizes = [tuple(int(v) for v in s.split("x")) for s in (args.sizes or (["512x512", "512x384"] if smoke else
                                                                          ["4096x4096", "4096x3072"]))]
    offloads = ["none"] if smoke else args.offload  # offload only moves weights between CPU and GPU
    peak = None if smoke else peak_flops(torch.cuda.get_device_name())
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak
    steps = args.steps or (2 if smoke else 4)
    emit({"bench": "machine", "device": "cpu (smoke)" if smoke else torch.cuda.get_device_name(),
          "peak_tflops": None if peak is None else peak / 1e12, "torch": torch.__version__})

    # Architecture check and analytic FLOPs of the full-size models (free on the meta device):
    for model in args.models:
        counts, transformer = parameter_counts(model)
        for name, billions in counts.items():
            emit({"bench": "architecture", "model": model, "component": name, "params_b": round(billions, 3),
                  "reference_b": REFERENCE_PARAMS_B[name], "ratio": ratio(billions, REFERENCE_PARAMS_B[name])})
        for height, width in ((4096, 4096), (4096, 3072)):
            flops = step_flops(model, transformer.config, height, width, MODELS[model].inference.guidance_scale)
            target = H100_TARGETS[model, "none"][0] if (height, width) == (4096, 4096) else None
            emit({"bench": "analytic", "model": model, "size": f"{height}x{width}",
                  "step_tflop": round(flops / 1e12, 2), "target_s_per_step": target,
                  "mfu_at_target_on_h100": None if target is None else round(flops / target / peak_flops("H100"), 3)})

    # Timed runs:
    tiny_dir = tempfile.TemporaryDirectory(prefix="bench_generation_")
    tiny = save_tiny_pipelines(tiny_dir.name) if smoke else None
    for model in args.models:
        if smoke:
            pipe = load_pipeline(model, tiny[model], dtype="fp32", device="cpu")
        else:
            start = time.perf_counter()
            pipe = full_size_pipeline(model, device)
            emit({"bench": "build", "model": model, "seconds": round(time.perf_counter() - start, 1)})
        pipe.set_progress_bar_config(disable=True)
        for height, width in sizes:
            for record in time_decoders(pipe, model, height, width, device, repeats=1 if smoke else 3):
                emit(record)
        baselines = {}
        for offload in offloads:
            if offload == "model":
                pipe.enable_model_cpu_offload(device=device)
            for height, width in sizes:
                record = time_steps(pipe, model, height, width, steps, peak, offload,
                                    baselines.get((height, width)) if offload != "none" else None)
                if offload == "none":
                    baselines[height, width] = record
                emit(record)
        del pipe
        if not smoke:
            torch.cuda.empty_cache()
    tiny_dir.cleanup()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny checkpoints on the CPU (no GPU needed)")
    parser.add_argument("--models", nargs="+", choices=("sd3", "flux"), default=["sd3", "flux"])
    parser.add_argument("--sizes", nargs="+", default=None, help="HxW, e.g. 4096x4096 4096x3072")
    parser.add_argument("--offload", nargs="+", choices=("none", "model"), default=["none", "model"])
    parser.add_argument("--steps", type=int, default=None, help="timed steps after one warm-up step")
    parser.add_argument("--peak_tflops", type=float, default=None, help="override the GPU's bf16 peak for MFU")
    return parser.parse_args(argv)


if __name__ == "__main__":
    exit_on_usage_error("python -m bench.bench_generation", main, parse_args())
