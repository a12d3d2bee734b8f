"""One GPU sweep of what 4K costs: generation in every low-memory mode, F=8 vs F=16 decode, training steps, GLCM.

    python -m bench.gpu_sweep [--out DIR] [--budget_s 280]   # one H100 / H200, about 5 minutes
    python -m bench.gpu_sweep --tiny                         # the same code path on the CPU, tiny models, seconds

GPU: full-size random-weight SD3-medium and FLUX.1-dev pipelines (bench_generation.full_size_pipeline), bf16.
  generation  s/step and peak GPU memory at 4096x4096 and 4096x3072 for each mode of low_memory.py and useful
              combinations, against no saving in the same run and the paper's Table 5 (one A100)
  decode      the F=8 decoder against the F=16 one (each decode mode, and with diffusers' tiling) at 4096x4096:
              fits or OOM, peak memory, time
  train       one training step at 4096x4096: SD3 full fine-tuning under DeepSpeed ZeRO-2 with the optimizer on
              the CPU, Flux LoRA without DeepSpeed; images/s and peak memory against Table 10
  glcm        GLCM Score of a 4096x4096 photo on the GPU against the CPU (the same scores to 1e-12)
Cases run in order of importance while the time left (--budget_s) allows; each skipped case is listed with the
reason. Writes DIR/gpu_sweep.json (every record) and DIR/gpu_sweep.md (the tables).
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
import torch

import accelerated
import lora
import low_memory
import training
from bench.bench_generation import (PAPER_A100, PROMPT, building_on, full_size_pipeline, full_size_vae,
                                    parameter_counts, ratio, sig, step_flops)
from bench.flops import peak_flops
from errors import HelpFormatter, UsageError, exit_on_usage_error
from generation import generate, load_pipeline
from models import MODELS
from partitioned_vae import make_f16_vae
from tiny_models import build_tiny_flux_pipeline, build_tiny_sd3_pipeline, build_tiny_vae, save_tiny_pipelines

# Generation modes: low_memory.py settings, the single savings first, then combinations aimed at 24 GB (Flux) and
# 12 GB (SD3) cards, then the fastest mode we expect.
MODES = {
    "none": {},
    "model": {"cpu_offload": "model"},  # Table 5's "CPU offload"
    "group": {"cpu_offload": "group"},
    "sequential": {"cpu_offload": "sequential"},
    "fp8": {"layerwise_casting": "fp8_e4m3"},
    "int8wo": {"quantize": "int8wo"},
    "float8dq": {"quantize": "float8dq"},
    "compile": {"compile": True},
    "model+float8dq": {"cpu_offload": "model", "quantize": "float8dq"},
    "group+fp8": {"cpu_offload": "group", "layerwise_casting": "fp8_e4m3"},
    "model+int8wo": {"cpu_offload": "model", "quantize": "int8wo"},
    "compile+float8dq": {"compile": True, "quantize": "float8dq"},
}
# Rough cost of a denoising step relative to no saving, to plan the time (measured figures replace the guesses).
STEP_COST = {"model": 1.1, "group": 1.5, "sequential": 4.0, "fp8": 1.2, "int8wo": 1.5, "float8dq": 0.8,
             "compile": 0.9}
COMPILE_S = 60  # first compilation of the transformer's blocks, per size
BUILD_S = {"sd3": 15, "flux": 30}  # building a full-size random pipeline on the GPU (more with offload)
GPU_SIZES = ((4096, 4096), (4096, 3072))
TINY_SIZES = ((128, 128), (128, 96))
# Paper Table 10 (4096x4096): images/s and GPUs; per-GPU throughput is what one GPU is compared against.
PAPER_TRAIN = {"sd3": (0.59, 2, "A800-80G"), "flux": (1.39, 8, "A100-80G")}


#################################################################################
#                               Planning the time                               #
#################################################################################

class Sweep:
    """Runs cases while the budget allows; keeps the records and the skipped cases with their reasons."""

    def __init__(self, budget_s, time_scale=1.0):
        self.budget_s, self.time_scale, self.started = budget_s, time_scale, time.perf_counter()
        self.records, self.skipped = [], []

    def left(self):
        """Seconds of the budget still unspent."""
        return self.budget_s - (time.perf_counter() - self.started)

    def skip(self, case, reason):
        """Record a case that did not run."""
        self.skipped.append({"case": case, "reason": reason})
        print(json.dumps({"skipped": case, "reason": reason}), flush=True)

    def run(self, case, estimate_s, measure):
        """measure() -> list of records, unless estimate_s (GPU seconds, times time_scale) exceeds the time left;
        an error is recorded, not raised."""
        estimate_s *= self.time_scale
        if estimate_s > self.left():
            self.skip(case, f"needs about {estimate_s:.0f} s, {max(self.left(), 0):.0f} s of the budget left")
            return []
        start = time.perf_counter()
        try:
            records = measure()
        except UsageError as error:  # a mode this machine cannot run (e.g. fp8 on the CPU)
            self.skip(case, str(error))
            return []
        except torch.OutOfMemoryError:
            records = [{"case": case, "fits": False, "error": "out of GPU memory"}]
        except Exception as error:  # one failing case must not cost the rest of the sweep
            records = [{"case": case, "error": f"{type(error).__name__}: {error}"[:500]}]
            traceback.print_exc()
        free_device_memory()
        for record in records:
            record.setdefault("case", case)
            record["case_s"] = round(time.perf_counter() - start, 1)
            self.records.append(record)
            print(json.dumps(record), flush=True)
        return records


def free_device_memory():
    """Release cached GPU memory between cases, so that each case's peak is its own."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def synchronize(device):
    """Wait for the GPU (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_gb(device):
    """Peak GPU memory allocated by torch since the last reset, in GB (None on the CPU)."""
    return torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None


#################################################################################
#                                  Generation                                   #
#################################################################################

def build_pipeline(model, device, tiny_paths):
    """A full-size random pipeline built on the GPU, or the tiny checkpoint loaded for the CPU (both with F=16)."""
    if tiny_paths:
        return load_pipeline(model, tiny_paths[model], dtype="fp32", device="cpu")
    return full_size_pipeline(model, device)


def apply_mode(pipe, mode, device):
    """Apply one MODES entry with low_memory.py, as test_sd3.py / test_flux.py do. The CLIs quantise while loading
    (diffusers' TorchAoConfig); a pipeline built in memory gets the same torchao config applied to it in place."""
    settings = {"cpu_offload": "none", "layerwise_casting": "none", "quantize": "none", "compile": False,
                **MODES[mode]}
    low_memory.check_low_memory(device, **settings)
    if settings["cpu_offload"] in ("model", "sequential") and device.type != "cuda":  # group runs CPU -> CPU too
        raise UsageError(f"--cpu_offload {settings['cpu_offload']} moves weights between the CPU and a GPU: "
                         f"it needs CUDA.")
    if settings["quantize"] != "none":
        from torchao.quantization import quantize_

        quantize_(pipe.transformer, low_memory.torchao_config(settings["quantize"]))
    return low_memory.apply_low_memory(pipe, device, settings["cpu_offload"], settings["layerwise_casting"],
                                       compile=settings["compile"])


def generation_records(model, mode, sizes, steps, device, tiny_paths, baseline, peak):
    """Build, apply `mode`, then one generation per size of steps+1 steps (the first is the warm-up)."""
    pipe = apply_mode(build_pipeline(model, device, tiny_paths), mode, device)
    pipe.set_progress_bar_config(disable=True)
    sampling = MODELS[model].inference
    records = []
    for height, width in sizes:
        free_device_memory()
        _, t = generate(pipe, PROMPT, height, width, steps + 1, sampling.guidance_scale, seed=0,
                        max_sequence_length=sampling.max_sequence_length)
        s_per_step = float(np.median(t["step_s"][1:]))
        flops = step_flops(model, pipe.transformer.config, height, width, sampling.guidance_scale)
        paper = PAPER_A100.get((model, mode)) if (height, width) == (4096, 4096) else None
        plain = baseline.get((model, height, width))
        records.append({
            "bench": "generation", "model": model, "mode": mode, "size": f"{height}x{width}", "steps_timed": steps,
            "s_per_step": sig(s_per_step), "first_step_s": sig(t["step_s"][0]), "vae_decode_s": sig(t["decode_s"]),
            "peak_gpu_gb": sig(t["peak_gpu_gb"], 3), "mfu": sig(flops / s_per_step / peak, 3) if peak else None,
            "ratio_vs_none_s": ratio(s_per_step, plain and plain["s_per_step"]),
            "ratio_vs_none_gb": ratio(t["peak_gpu_gb"], plain and plain["peak_gpu_gb"]),
            "paper_a100_s_per_step": paper and paper[0], "paper_a100_gb": paper and paper[1],
        })
        if mode == "none":
            baseline[model, height, width] = records[-1]
    return records


def generation_estimate(model, mode, sizes, steps, baseline, device):
    """Seconds a generation case should take: build, steps (measured without saving if known) and compilation."""
    seconds = BUILD_S[model] * (2 if MODES[mode].get("cpu_offload") else 1)
    for height, width in sizes:
        plain = baseline.get((model, height, width))
        step = plain["s_per_step"] if plain else step_flops(model, full_config(model), height, width,
                                                             MODELS[model].inference.guidance_scale) / 3e14
        cost = max([STEP_COST.get(part, 1.0) for part in mode.split("+")])
        seconds += (steps + 1) * step * cost + 5  # + text encoding and the decode
        seconds += COMPILE_S if MODES[mode].get("compile") else 0
    return seconds


@lru_cache(maxsize=None)
def full_config(model):
    """The full-size transformer's config (bench_generation's architecture, built on the meta device: free)."""
    return dict(parameter_counts(model)[1].config)


#################################################################################
#                                    Decode                                     #
#################################################################################

def decode_records(factor, mode, size, device, tiling, repeats, tiny):
    """Decode one random latent of a size x size image with the SD3 VAE (full-size on the GPU, tiny for --tiny):
    F=8 (stock) or F=16 in `mode`."""
    from bench.bench_vae import sd3_vae

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    vae = build_tiny_vae("sd3").eval() if tiny else sd3_vae(dtype, device)
    if factor == 16:
        make_f16_vae(vae, mode, grid=2)
    if tiling:
        vae.enable_tiling()
    latents = torch.randn(1, 16, size // factor, size // factor, generator=torch.Generator().manual_seed(0))
    latents = latents.to(device, dtype)
    with torch.no_grad():
        vae.decode(latents[..., :8, :8])  # kernels loaded before timing
        free_device_memory()
        base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
        times = []
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            image = vae.decode(latents).sample
            synchronize(device)
            times.append(time.perf_counter() - start)
            del image
    extra = None if device.type != "cuda" else (torch.cuda.max_memory_allocated() - base) / 1e9
    return [{"bench": "decode", "vae": f"F{factor}", "mode": mode if factor == 16 else "stock", "tiling": tiling,
             "size": f"{size}x{size}", "fits": True, "decode_s": sig(float(np.median(times))),
             "decode_extra_gb": sig(extra, 3), "paper_a100": "OOM" if factor == 8 and not tiling else None}]



#################################################################################
#                                Training steps                                 #
#################################################################################

# (model, engine): SD3 fine-tuned in full under ZeRO-2 with the optimizer on the CPU (ds_config.yaml, the paper's
# setting); Flux-12B with a LoRA adapter (rank TRAIN_LORA_RANK) and no DeepSpeed, to fit one GPU.
TRAIN_CASES = {"sd3_full_zero2": ("sd3", "zero2", 0), "flux_lora": ("flux", "plain", 64)}
TRAIN_TEXT_TOKENS = {"sd3": 77 + 77, "flux": 512}  # CLIP 77 + T5 77 (SD3, the authors); T5 512 (Flux)


def train_records(case, tiny, steps):
    """Run one training case in a fresh process (its own DeepSpeed world, its own peak memory); its JSON record."""
    with socket.socket() as probe:  # a free port for the process group of a one-process DeepSpeed run
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0"}
    command = [sys.executable, "-m", "bench.gpu_sweep", "--train_case", case, "--steps", str(steps)]
    done = subprocess.run(command + (["--tiny"] if tiny else []), cwd=Path(__file__).resolve().parents[1], env=env,
                          capture_output=True, text=True, timeout=900)
    if done.returncode:
        raise RuntimeError(f"training case {case} failed: {done.stderr[-1500:]}")
    return [json.loads(done.stdout.strip().splitlines()[-1])]


def train_step_case(case, tiny, steps):
    """One optimiser step after another with training.py's loss, optimiser and update, at 4096x4096 (tiny: 128)."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.optimization import get_scheduler

    model, engine, rank = TRAIN_CASES[case]
    spec, device = MODELS[model], torch.device("cpu" if tiny else "cuda")
    precision = "no" if tiny else "bf16"
    plugin = DeepSpeedPlugin(zero_stage=2, offload_optimizer_device="cpu") if engine == "zero2" else None
    accelerator = Accelerator(mixed_precision=precision, deepspeed_plugin=plugin)
    training.configure_deepspeed(accelerator, 1, 1.0, False)
    dtype = torch.bfloat16 if not tiny and (engine == "zero2" or rank) else torch.float32
    torch.manual_seed(0)
    if tiny:
        pipe = (build_tiny_sd3_pipeline if model == "sd3" else build_tiny_flux_pipeline)()
        transformer, vae, resolution = pipe.transformer.to(dtype), pipe.vae, 128
    else:
        with building_on(device, dtype):
            transformer = spec.transformer_class.from_config(full_config(model))
        vae, resolution = full_size_vae(model).to(device, dtype), 4096
    make_f16_vae(vae)
    transformer.enable_gradient_checkpointing()
    transformer.train()
    params = transformer.parameters()
    if rank:
        params = lora.attach_for_training(transformer, lora.lora_config(transformer, rank), torch.float32)
    optimizer = training.build_optimizer(params, accelerator, lr=1e-6, betas=(0.9, 0.999), eps=1e-8,
                                         weight_decay=1e-4)
    schedule = get_scheduler("constant", optimizer)
    transformer, optimizer, schedule = accelerator.prepare(transformer, optimizer, schedule)
    config = accelerator.unwrap_model(transformer).config
    tokens = TRAIN_TEXT_TOKENS[model] if not tiny else 32
    batch = {"latent_dist": torch.randn(1, 32, resolution // 16, resolution // 16, device=device),
             "prompt_embeds": torch.randn(1, tokens, config.joint_attention_dim, device=device),
             "pooled_prompt_embeds": torch.randn(1, config.pooled_projection_dim, device=device)}
    predict = partial(spec.predict, guidance_scale=spec.train_guidance_scale)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    loss_fn = training.build_loss("wlf")
    model_dtype = accelerator.unwrap_model(transformer).dtype
    times = []
    for step in range(steps + 1):  # the first step is the warm-up
        synchronize(device)
        start = time.perf_counter()
        generator = accelerated.step_generator(0, step, 0, 0, device)
        loss = training.training_loss(transformer, predict, batch, vae, scheduler, loss_fn, generator, model_dtype,
                                      training.LossSettings(spec.train_weighting_scheme))
        training.update_weights(accelerator, transformer, optimizer, schedule, loss, 1.0)
        synchronize(device)
        times.append(time.perf_counter() - start)
    seconds = float(np.median(times[1:]))
    paper, gpus, gpu_name = PAPER_TRAIN[model]
    trainable = sum(p.numel() for p in accelerator.unwrap_model(transformer).parameters() if p.requires_grad)
    return {"bench": "train", "case": f"train {case}", "model": model,
            "engine": f"{'DeepSpeed ZeRO-2, optimizer on the CPU' if engine == 'zero2' else 'accelerate'}, "
                      f"{'full fine-tuning' if not rank else f'LoRA rank {rank}'}",
            "resolution": resolution, "batch": 1, "trainable_params_b": sig(trainable / 1e9),
            "s_per_step": sig(seconds), "images_per_second": sig(1 / seconds), "peak_gpu_gb": sig(peak_gb(device), 3),
            "optimizer": training.describe_engine(accelerator, optimizer)["optimizer"],
            "paper_images_per_second_per_gpu": sig(paper / gpus, 3), "paper_gpus": f"{gpus}x {gpu_name}"}

#################################################################################
#                                     GLCM                                      #
#################################################################################

def glcm_records(size, device):
    """GLCM Score of one photo upscaled to size x size on the CPU (all threads) and on `device`: time, equality."""
    from bench.bench_glcm import ours_patch_scores, upscaled

    image = upscaled("astronaut", size)
    start = time.perf_counter()
    cpu = ours_patch_scores(image)
    cpu_s = time.perf_counter() - start
    records = [{"bench": "glcm", "size": f"{size}x{size}", "device": "cpu", "threads": torch.get_num_threads(),
                "s_per_image": sig(cpu_s)}]
    if device.type == "cuda":
        ours_patch_scores(image, device="cuda")  # warm-up
        synchronize(device)
        start = time.perf_counter()
        gpu = ours_patch_scores(image, device="cuda")
        synchronize(device)
        gpu_s = time.perf_counter() - start
        records.append({"bench": "glcm", "size": f"{size}x{size}", "device": "cuda", "s_per_image": sig(gpu_s),
                        "speedup_vs_cpu": ratio(cpu_s, gpu_s),
                        "max_abs_difference": float(np.abs(np.asarray(gpu) - np.asarray(cpu)).max())})
    return records


#################################################################################
#                                Tables and main                                #
#################################################################################

def cell(value, unit=""):
    """A table cell: the value with its unit, or a dash."""
    return "–" if value is None else f"{value}{unit}"


def section(records, bench, title, columns, row):
    """One markdown table of the sweep: the records of `bench` (by their "bench" key or their case name), each as
    the cells `row(record)`, or its case and error when it failed."""
    mine = [r for r in records if r.get("bench") == bench or r.get("case", "").startswith(bench)]
    if not mine:
        return []
    lines = [f"## {title}", "", "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for r in mine:
        cells = [r["case"], f"error: {r['error']}"] if "error" in r else row(r)
        lines.append("| " + " | ".join(str(c) for c in cells + [""] * (len(columns) - len(cells))) + " |")
    return lines + [""]


def generation_row(r):
    paper = f"{r['paper_a100_s_per_step']} s, {r['paper_a100_gb']} GB" if r["paper_a100_gb"] else "–"
    return [r["model"], r["mode"], r["size"], cell(r["s_per_step"]), cell(r["peak_gpu_gb"]),
            f"{cell(r['ratio_vs_none_s'], 'x')}, {cell(r['ratio_vs_none_gb'], 'x')}", paper]


def markdown(summary):
    """The sweep's tables (beside the paper's Table 5 and Table 10) and what was skipped."""
    records = summary["records"]
    lines = [f"# GPU sweep: {summary['device']}", "", f"`{summary['command']}`, {summary['date']}, torch "
             f"{summary['torch']}, {summary['elapsed_s']} s of a {summary['budget_s']} s budget.", ""]
    lines += section(records, "generation", "Generation (s/step, peak GPU memory) beside Table 5 (one A100, bf16, "
                     "4096x4096)", ["model", "mode", "size", "s/step", "peak GB", "vs none (time, memory)",
                                    "Table 5 A100"], generation_row)
    lines += section(records, "decode", "VAE decode, F=8 against F=16 (Table 5: F=8 out of memory on an A100 at "
                     "4096x4096)", ["VAE", "mode", "tiling", "size", "fits", "decode s", "extra GB"],
                     lambda r: [r["vae"], r["mode"], r["tiling"], r["size"], r["fits"], cell(r["decode_s"]),
                                cell(r["decode_extra_gb"])])
    lines += section(records, "train", "One training step beside Table 10 (4096x4096)",
                     ["model", "engine", "size", "images/s", "peak GB", "Table 10 (images/s per GPU)"],
                     lambda r: [r["model"], r["engine"], f"{r['resolution']}²", cell(r["images_per_second"]),
                                cell(r["peak_gpu_gb"]), cell(r["paper_images_per_second_per_gpu"])])
    lines += section(records, "glcm", "GLCM Score, GPU against CPU",
                     ["size", "device", "s/image", "speedup", "max difference"],
                     lambda r: [r["size"], r["device"], r["s_per_image"], cell(r.get("speedup_vs_cpu"), "x"),
                                cell(r.get("max_abs_difference"))])
    if summary["skipped"]:
        lines += ["## Skipped", ""] + [f"- {s['case']}: {s['reason']}" for s in summary["skipped"]] + [""]
    return "\n".join(lines)


def plan(args):
    """[(case, estimate function, measure function)] in order of importance."""
    device = torch.device("cpu" if args.tiny else "cuda")
    sizes = TINY_SIZES if args.tiny else GPU_SIZES
    steps = 1 if args.tiny else args.steps
    tiny_paths = save_tiny_pipelines(args.tiny_dir) if args.tiny else None
    peak = None if args.tiny else peak_flops(torch.cuda.get_device_name())
    baseline = {}
    decode_size = 512 if args.tiny else 4096  # the tiny VAE tiles at 256

    def generation(model, mode):
        return (f"generation {model} {mode}", lambda: generation_estimate(model, mode, sizes, steps, baseline, device),
                lambda: generation_records(model, mode, sizes, steps, device, tiny_paths, baseline, peak))

    def decode(factor, mode, tiling=False):
        return (f"decode F{factor} {mode}{' tiled' if tiling else ''}", lambda: 15 if factor == 16 else 30,
                lambda: decode_records(factor, mode, decode_size, device, tiling, 1 if args.tiny else 2, args.tiny))

    cases = [generation(m, mode) for m in args.models for mode in ("none", "model")]  # Table 5's rows first
    cases += [decode(8, "stock"), decode(16, "partitioned"), decode(16, "subpixel"), decode(16, "full"),
              decode(16, "partitioned", tiling=True), decode(8, "stock", tiling=True)]
    cases += [(f"train {case}", lambda: 150 if TRAIN_CASES[case][1] == "zero2" else 90,
               partial(train_records, case, args.tiny, 1 if args.tiny else args.steps))
              for case in TRAIN_CASES if TRAIN_CASES[case][0] in args.models]
    cases += [generation(m, mode) for mode in MODES if mode not in ("none", "model") for m in args.models]
    cases.append(("glcm", lambda: 20, lambda: glcm_records(256 if args.tiny else 4096, device)))
    return cases


def chosen(case, only, skip):
    """Whether --only / --skip let `case` run."""
    return (not only or any(word in case for word in only)) and not any(word in case for word in skip or ())


def main(args):
    if args.train_case:  # the worker process of train_records
        print(json.dumps(train_step_case(args.train_case, args.tiny, args.steps)), flush=True)
        return None
    if not args.tiny and not torch.cuda.is_available():
        raise UsageError("No CUDA GPU: the sweep measures GPU time and memory. Run `python -m bench.gpu_sweep --tiny` "
                         "for the same code path on the CPU with tiny models.")
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sweep = Sweep(args.budget_s, time_scale=0.0 if args.tiny else 1.0)  # tiny cases take a moment each
    with tempfile.TemporaryDirectory(prefix="gpu_sweep_") as tiny_dir:
        args.tiny_dir = tiny_dir
        for case, estimate, measure in plan(args):
            if chosen(case, args.only, args.skip):
                sweep.run(case, estimate(), measure)
            else:
                by_skip = any(word in case for word in args.skip or ())
                sweep.skip(case, "left out by --skip" if by_skip else "not named by --only")
    summary = {
        "command": "python -m bench.gpu_sweep " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                               time.gmtime()),
        "device": "CPU, tiny models (--tiny)" if args.tiny else torch.cuda.get_device_name(),
        "torch": torch.__version__, "budget_s": args.budget_s,
        "elapsed_s": round(time.perf_counter() - sweep.started, 1), "records": sweep.records,
        "skipped": sweep.skipped,
    }
    (out / "gpu_sweep.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "gpu_sweep.md").write_text(markdown(summary))
    print(f"wrote {out / 'gpu_sweep.json'} and {out / 'gpu_sweep.md'}: {len(sweep.records)} records, "
          f"{len(sweep.skipped)} skipped", flush=True)
    return summary


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_sweep", description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU: checks the code path only")
    parser.add_argument("--out", default="gpu_sweep", help="folder for gpu_sweep.json and gpu_sweep.md")
    parser.add_argument("--budget_s", type=float, default=280, help="stop starting cases after this many seconds")
    parser.add_argument("--steps", type=int, default=2, help="timed denoising steps per generation, after a warm-up")
    parser.add_argument("--models", nargs="+", choices=("sd3", "flux"), default=["sd3", "flux"])
    parser.add_argument("--only", nargs="+", default=None, help="run only cases whose name holds one of these words")
    parser.add_argument("--train_case", choices=tuple(TRAIN_CASES), help=argparse.SUPPRESS)
    parser.add_argument("--skip", nargs="+", default=None, help="leave out cases whose name holds one of these words")
    return parser.parse_args(argv)


if __name__ == "__main__":
    exit_on_usage_error("python -m bench.gpu_sweep", main, parse_args())
