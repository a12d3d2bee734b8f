"""`prepare_data.py filter` throughput on 4096² JPEGs (q95, natural photos upscaled), decode included, one process, in
images per second per core; the same images scored the authors' way (decode + their skimage GLCM loop + the q95 JPEG
for the Compression Ratio) timed in the same run; and the extrapolated cost of a 100,000-image set on 16 cores.

    python -m bench.bench_prepare_data [--images 4] [--size 4096]
"""
import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

import detail_metrics as dm
import prepare_data
from bench.bench_glcm import PHOTOS, reference_patch_scores, upscaled
from errors import HelpFormatter, exit_on_usage_error


def emit(**fields):
    """One JSON line."""
    print(json.dumps(fields), flush=True)


def authors_way(path):
    """Decode, the authors' GLCM loop and the q95 JPEG of one image."""
    rgb = dm.to_rgb8(path)
    return float(np.mean(reference_patch_scores(rgb))), rgb.size / dm.jpeg_bytes(rgb)


def main(args):
    import torch
    torch.set_num_threads(1)
    emit(bench="prepare_data_filter", machine={"cpu_cores": os.cpu_count(),
                                               "load_avg_1min": round(os.getloadavg()[0], 2)})
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        root.mkdir()
        names = [f"{k:03d}.jpg" for k in range(args.images)]
        for k, name in enumerate(names):
            dm.Image.fromarray(upscaled(PHOTOS[k % len(PHOTOS)], args.size)).save(root / name, quality=95)
        (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": "a photo"}) + "\n"
                                                     for n in names))
        prepare_data.score_image(np.zeros((64, 64, 3), np.uint8), 2.0)  # JIT warm-up, not timed
        start, cpu = time.perf_counter(), time.process_time()
        prepare_data.main(prepare_data.parse_args(["filter", str(root), "--out", str(Path(tmp) / "out"),
                                                   "--workers", "1"]))
        ours, ours_cpu = time.perf_counter() - start, time.process_time() - cpu
        start = time.perf_counter()
        authors_way(root / names[0])
        reference = time.perf_counter() - start
    per_core = args.images / ours
    emit(bench="prepare_data_filter", size=f"{args.size}x{args.size}", images=args.images, mode="ours_1proc",
         s_per_image=round(ours / args.images, 3), cpu_s_per_image=round(ours_cpu / args.images, 3),
         images_per_s_per_core=round(per_core, 3))
    emit(bench="prepare_data_filter", size=f"{args.size}x{args.size}", images=1, mode="authors_way_1proc",
         s_per_image=round(reference, 3), speedup=round(reference / (ours / args.images), 2))
    hours = 100_000 / (per_core * 16) / 3600
    emit(bench="prepare_data_filter", extrapolated="100,000 images on 16 cores, one process per core, linear",
         hours=round(hours, 2), core_hours=round(hours * 16, 1))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--size", type=int, default=4096)
    return parser.parse_args(argv)


if __name__ == "__main__":
    exit_on_usage_error("python -m bench.bench_prepare_data", main, parse_args())
