"""Benchmark the F=16 VAE's three decode modes: peak memory and time, last layer alone and whole decoder (PROTOCOL.md §11).

Every figure is compared with `full` (the un-partitioned up-sample + conv) measured in the same run. CPU peaks are
the RSS high-water mark (ru_maxrss, reset just before the call) of a fresh interpreter per measurement, above its RSS
once model and inputs exist; GPU peaks are torch.cuda.max_memory_allocated above the memory in use before the call.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from diffusers import AutoencoderKL

from errors import HelpFormatter, exit_on_usage_error
from partitioned_vae import MODES, PartitionedConv, make_f16_vae

ROOT = Path(__file__).resolve().parents[1]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GIB = 2 ** 30


#################################################################################
#                                  Workloads                                    #
#################################################################################

def sd3_vae(dtype, device):
    """The full-size SD3 / Flux VAE topology (PROTOCOL.md §11) with random weights."""
    torch.manual_seed(0)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
        scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    return vae.to(device=device, dtype=dtype).eval()


def workload(kind, mode, size, dtype, device, grid):
    """(callable, input, description) for one measurement; `size` is the output image side."""
    if kind == "last_layer":  # decoder.conv_out of the F=16 VAE on its (1, 128, size/2, size/2) input
        torch.manual_seed(0)
        layer = PartitionedConv(nn.Conv2d(128, 3, 3, padding=1), mode, grid).to(device=device, dtype=dtype)
        return layer, torch.randn(1, 128, size // 2, size // 2, dtype=dtype, device=device)
    if kind == "f8_decoder":  # the pretrained F=8 decode of the same output size, for comparison
        vae = sd3_vae(dtype, device)
        return (lambda z: vae.decode(z).sample), torch.randn(1, 16, size // 8, size // 8, dtype=dtype, device=device)
    vae = make_f16_vae(sd3_vae(dtype, device), mode, grid)
    return (lambda z: vae.decode(z).sample), torch.randn(1, 16, size // 16, size // 16, dtype=dtype, device=device)


def hidden_map_bytes(size, dtype, mode, grid):
    """Largest up-sampled map the mode materialises: 128 x size^2 (full), one tile plus halo (partitioned), none."""
    item = torch.empty((), dtype=dtype).element_size()
    if mode == "full":
        return 128 * size * size * item
    if mode == "partitioned":
        tile = 2 * (-(-size // 2 // grid) + 2)  # ceil(size/2 / grid) low-res rows + 2 halo rows, up-sampled
        return 128 * tile * tile * item
    return 0


#################################################################################
#                                 Measurements                                  #
#################################################################################

def current_rss():
    """Resident set size of this process, in bytes."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss():
    """Reset the kernel's RSS high-water mark (Linux: write 5 to /proc/self/clear_refs); False if not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure_cpu(kind, mode, size, dtype, grid):
    """Time and peak RSS of one call above the RSS before it (model and inputs already built), in this process."""
    torch.set_grad_enabled(False)
    fn, x = workload(kind, mode, size, DTYPES[dtype], "cpu", grid)
    fn(x[:, :, :16, :16])  # load the kernels on a small input first
    reset = reset_peak_rss()
    base = current_rss()
    start = time.perf_counter()
    out = fn(x)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # Without the reset, the high-water mark may predate the call (model building): then peak_bytes is an upper bound.
    return {"peak_bytes": peak - base, "peak_rss_reset": reset, "time_s": round(seconds, 3),
            "output_shape": list(out.shape)}


def run_cpu(kind, mode, size, dtype, grid):
    """`measure_cpu` in a fresh interpreter, so ru_maxrss is that measurement's own high-water mark."""
    spec = {"kind": kind, "mode": mode, "size": size, "dtype": dtype, "grid": grid}
    done = subprocess.run([sys.executable, "-m", "bench.bench_vae", "--measure", json.dumps(spec)], cwd=ROOT,
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"measurement {spec} failed:\n{done.stderr[-2000:]}")
    return {**spec, "device": "cpu", **json.loads(done.stdout.strip().splitlines()[-1])}


def run_gpu(kind, mode, size, dtype, grid, repeats=3):
    """Median time of `repeats` calls after a warm-up, and peak allocated memory above what was in use before."""
    spec = {"kind": kind, "mode": mode, "size": size, "dtype": dtype, "grid": grid, "device": "cuda"}
    torch.set_grad_enabled(False)
    try:
        fn, x = workload(kind, mode, size, DTYPES[dtype], "cuda", grid)
        fn(x)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            out = fn(x)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            del out
        result = {**spec, "fits": True, "peak_bytes": torch.cuda.max_memory_allocated() - base,
                  "time_s": round(sorted(times)[len(times) // 2], 4)}
    except torch.OutOfMemoryError:
        result = {**spec, "fits": False}
    fn = x = None
    torch.cuda.empty_cache()
    return result


def with_figures(result):
    """Add GiB and the analytic size of the largest hidden map to a measurement."""
    if "peak_bytes" in result:
        result["peak_gib"] = round(result["peak_bytes"] / GIB, 3)
    if result["kind"] != "f8_decoder":
        hidden = hidden_map_bytes(result["size"], DTYPES[result["dtype"]], result["mode"], result["grid"])
        result["hidden_map_gib_analytic"] = round(hidden / GIB, 3)
    return result


def ratios(results):
    """One line per non-`full` result: its peak memory and time relative to `full` of the same workload."""
    lines = []
    for r in results:
        ref = next((f for f in results if f["mode"] == "full" and f["kind"] == r["kind"] and f["size"] == r["size"]
                    and f["dtype"] == r["dtype"] and f["device"] == r["device"] and "peak_bytes" in f), None)
        if r["mode"] == "full" or ref is None or "peak_bytes" not in r:
            continue
        lines.append({"ratio": f"{r['mode']} vs full", "kind": r["kind"], "device": r["device"], "dtype": r["dtype"],
                      "size": r["size"], "peak_memory_full_over_mode": round(ref["peak_bytes"] / max(r["peak_bytes"], 1), 2),
                      "speedup_over_full": round(ref["time_s"] / max(r["time_s"], 1e-9), 2)})
    return lines


#################################################################################
#                                     Main                                      #
#################################################################################

def main(args):
    if args.measure:  # worker: one CPU measurement, printed as the last line
        print(json.dumps(measure_cpu(**json.loads(args.measure))))
        return

    print(json.dumps({"machine": os.uname().nodename, "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                      "load_avg": os.getloadavg(), "torch": torch.__version__,
                      "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}))
    results = []

    # CPU: the last layer in fp32, then in bf16 at 4096^2 (`full` there only with --slow: ~10 min, 8 GiB on 2 cores):
    plan = [("last_layer", m, args.cpu_last_layer_size, "fp32") for m in MODES]
    plan += [("last_layer", m, args.cpu_bf16_size, "bf16") for m in MODES if m != "full" or args.slow]
    # CPU: the whole decoder, fp32 (4096^2 needs ~40 TFLOP and > 24 GiB: not on this machine):
    plan += [("decoder", m, args.cpu_decoder_size, "fp32") for m in MODES]
    for kind, mode, size, dtype in plan:
        results.append(with_figures(run_cpu(kind, mode, size, dtype, args.grid)))
        print(json.dumps(results[-1]), flush=True)

    # GPU, bf16 at 4096^2: last layer, whole decoder, and whether the pretrained F=8 decode fits at all:
    if torch.cuda.is_available():
        plan = [("last_layer", m, 4096) for m in MODES] + [("decoder", m, 4096) for m in MODES]
        plan += [("f8_decoder", "f8", 4096)]
        for kind, mode, size in plan:
            results.append(with_figures(run_gpu(kind, mode, size, "bf16", args.grid)))
            print(json.dumps(results[-1]), flush=True)
    else:
        print(json.dumps({"gpu": "not measured (no CUDA device)"}))

    for line in ratios(results):
        print(json.dumps(line))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--grid", type=int, default=2, help="partitions per side (the paper: 2)")
    parser.add_argument("--cpu_last_layer_size", type=int, default=2048, help="output side, fp32 last-layer runs")
    parser.add_argument("--cpu_bf16_size", type=int, default=4096, help="output side, bf16 last-layer runs")
    parser.add_argument("--cpu_decoder_size", type=int, default=512, help="output side, fp32 whole-decoder runs")
    parser.add_argument("--slow", action="store_true", help="also run `full` in the bf16 last-layer runs on the CPU")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    exit_on_usage_error("python -m bench.bench_vae", main, parse_args())
