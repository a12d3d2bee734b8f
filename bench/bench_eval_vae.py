"""Benchmark eval_vae.py at 2048^2 on the CPU: seconds per image and peak memory, F=8 against F=16 partitioned/sub-pixel.

The full-size SD3/Flux VAE topology with random weights (block_out_channels 128, 256, 512, 512); real photos
(scikit-image's, enlarged to 2048 on the shorter side). Each mode runs eval_vae's `main` in a fresh interpreter:
seconds per image are the wall time of `main` (VAE loading included) divided by the images, with the process's CPU
time beside it (steadier on a shared machine); the peak is the interpreter's RSS high-water mark (ru_maxrss). The pixel metrics need no weight files; LPIPS and rFID are left out (their cost
does not depend on the VAE mode). F=8 is the reference the others are compared with, in the same run; the exact F=16
modes must give the same PSNR. Run from the repository root: `python -m bench.bench_eval_vae`.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from PIL import Image
from skimage import data

from errors import HelpFormatter, exit_on_usage_error

MODES = ("f8", "partitioned", "subpixel", "f8_half")
PHOTOS = ("astronaut", "coffee", "chelsea")


def full_size_vae():
    """The SD3 / Flux VAE architecture with random weights (16 latent channels, no quant convs)."""
    torch.manual_seed(0)
    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
                         scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)


def write_inputs(folder, size, n_images):
    """(vae_dir, data_dir) under `folder`: the random full-size VAE and n photos at least `size` on the short side."""
    full_size_vae().save_pretrained(folder / "vae")
    images = folder / "photos"
    images.mkdir()
    for name in PHOTOS[:n_images]:
        photo = Image.fromarray(getattr(data, name)())
        scale = size / min(photo.size)
        photo.resize((round(photo.width * scale), round(photo.height * scale)), Image.BICUBIC).save(images / f"{name}.png")
    return folder / "vae", images


def measure(vae_dir, data_dir, size, mode, output_json):
    """Worker: eval_vae.main on every photo; its time per image and this interpreter's peak RSS."""
    import eval_vae

    args = eval_vae.parse_args(["--vae", str(vae_dir), "--data_dir", str(data_dir), "--size", str(size),
                                "--vae_mode", mode, "--output_json", str(output_json), "--metrics",
                                "nmse,nrmse,psnr,ssim", "--device", "cpu", "--num_workers", "0", "--no_progress"])
    start, cpu_start = time.perf_counter(), time.process_time()
    summary = eval_vae.main(args)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return {"mode": mode, "size": size, "n_images": summary["n_images"],
            "seconds_per_image": round(seconds / summary["n_images"], 1),
            "cpu_seconds_per_image": round(cpu_seconds / summary["n_images"], 1),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "psnr": summary["psnr"]}


def run(vae_dir, data_dir, size, mode, output_json):
    """`measure` in a fresh interpreter, so the peak is that mode's own."""
    spec = json.dumps({"vae_dir": str(vae_dir), "data_dir": str(data_dir), "size": size, "mode": mode,
                       "output_json": str(output_json)})
    done = subprocess.run([sys.executable, "-m", "bench.bench_eval_vae", "--measure", spec], capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parents[1])
    if done.returncode == -9:  # the kernel's OOM killer (SIGKILL): the mode does not fit in this machine's memory
        return {"mode": mode, "size": size, "status": "killed by the out-of-memory killer"}
    if done.returncode:
        raise RuntimeError(f"{mode} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(args):
    if args.measure:
        print(json.dumps(measure(**json.loads(args.measure))))
        return
    print(json.dumps({"machine": os.uname().nodename, "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                      "load_avg": os.getloadavg(), "torch": torch.__version__, "size": args.size,
                      "images": args.images}))
    with tempfile.TemporaryDirectory() as tmp:
        vae_dir, data_dir = write_inputs(Path(tmp), args.size, args.images)
        results = {}
        for mode in args.modes.split(","):
            results[mode] = run(vae_dir, data_dir, args.size, mode, Path(tmp) / f"{mode}.json")
            print(json.dumps(results[mode]), flush=True)
    reference = results.get("f8")
    for mode, result in results.items():
        if reference and "status" not in reference and "status" not in result and mode != "f8":
            print(json.dumps({"ratio": f"{mode} vs f8", "time_f8_over_mode": round(
                reference["seconds_per_image"] / result["seconds_per_image"], 2), "cpu_time_f8_over_mode": round(
                reference["cpu_seconds_per_image"] / result["cpu_seconds_per_image"], 2), "peak_f8_over_mode": round(
                reference["peak_rss_gib"] / result["peak_rss_gib"], 2)}))
    if "partitioned" in results and "subpixel" in results:
        print(json.dumps({"check": "partitioned and subpixel give the same PSNR",
                          "difference_db": abs(results["partitioned"]["psnr"] - results["subpixel"]["psnr"])}))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--images", type=int, default=1, help="photos per mode (1 to 3)")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    exit_on_usage_error("python -m bench.bench_eval_vae", main, parse_args())
