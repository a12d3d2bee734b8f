"""GLCM Score speed: detail_metrics (vectorised torch, one process / all cores / GPU) against the authors' loop
(skimage graycomatrix + shannon_entropy per 64×64 patch, one process), on natural photos (skimage.data) upscaled
to 2048² and 4096², all timed in the same run. Every mode must give the reference's patch scores (to 1e-12).
The entropy on the CPU runs detail_metrics' compiled kernel: it is compiled (or loaded from numba's cache) before
any timing.

    python -m bench.bench_glcm [--sizes 2048 4096] [--workers N]
"""
import argparse
import json
import multiprocessing
import os
import time

import numpy as np
import torch
from PIL import Image
from skimage import data
from skimage.feature import graycomatrix, graycoprops
from skimage.measure import shannon_entropy

import detail_metrics as dm
from errors import HelpFormatter, exit_on_usage_error

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
IMAGES = []  # filled before the worker processes fork, so that they receive indices, not 50 MB arrays


def upscaled(name, size):
    """A scikit-image photograph, bicubic-upscaled to size×size."""
    return np.asarray(Image.fromarray(getattr(data, name)()).resize((size, size), Image.BICUBIC))


def reference_patch_scores(rgb, prop="entropy"):
    """The authors' eval.py loop: skimage per 64×64 patch (grey from OpenCV's formula)."""
    grey = dm.grey64(rgb).numpy()
    scores = []
    for i in range(grey.shape[0] // 64):
        for j in range(grey.shape[1] // 64):
            glcm = graycomatrix(grey[i * 64:(i + 1) * 64, j * 64:(j + 1) * 64], [1, 2, 3, 4],
                                [0, np.pi / 4, np.pi / 2, np.pi * 3 / 4], levels=64, normed=True)
            scores.append(shannon_entropy(glcm) if prop == "entropy" else np.mean(graycoprops(glcm, prop).round(4)))
    return np.array(scores)


def ours_patch_scores(rgb, prop="entropy", device="cpu"):
    """detail_metrics on one image (grey conversion included), scores on the CPU."""
    return dm.glcm_patch_scores(dm.grey64(rgb, device), prop)


def timed(fn, *args):
    """(result, wall seconds, CPU seconds of this process)."""
    start, cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start, time.process_time() - cpu


def ours_by_index(k, prop="entropy", rows=slice(None)):
    """ours_patch_scores of IMAGES[k][rows], in a worker process."""
    return ours_patch_scores(IMAGES[k][rows], prop)


def emit(**fields):
    """One JSON line."""
    print(json.dumps(fields), flush=True)


def main(args):
    torch.set_num_threads(1)
    machine = {"cpu_cores": os.cpu_count(), "load_avg_1min": round(os.getloadavg()[0], 2),
               "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    emit(bench="glcm", machine=machine, note="wall-clock, other processes share the CPU: compare ratios, "
         "all measured in this run")
    for size in args.sizes:
        IMAGES.extend(upscaled(name, size) for name in PHOTOS[:args.images])
    IMAGES.append(upscaled("coffee", 2048))
    warm = np.ascontiguousarray(IMAGES[-1][:64, :64])
    warm.flags.writeable = False  # the photos are read-only arrays: numba compiles a kernel per array type
    ours_patch_scores(warm)  # JIT warm-up (numba, cached on disk after the first run), not timed
    pool = multiprocessing.get_context("fork").Pool(args.workers)  # start-up not timed; torch has 1 thread here

    for size in args.sizes:
        index = [k for k, im in enumerate(IMAGES[:-1]) if im.shape[0] == size]
        images = [IMAGES[k] for k in index]
        n_patches = (size // 64) ** 2 * len(images)

        # Reference: the authors' loop, one process.
        ref, t_ref, cpu_ref = timed(lambda: [reference_patch_scores(im) for im in images])

        # Ours, one process (one thread), then all cores over the images.
        ours, t_one, cpu_one = timed(lambda: [ours_patch_scores(im) for im in images])
        pooled, t_pool, _ = timed(lambda: pool.map(ours_by_index, index))
        for r, a, b in zip(ref, ours, pooled):
            np.testing.assert_allclose(a, r, rtol=0, atol=1e-12)
            np.testing.assert_allclose(b, r, rtol=0, atol=1e-12)
        per_image = {"reference_1proc": t_ref / len(images), "ours_1proc": t_one / len(images),
                     f"ours_{args.workers}proc": t_pool / len(images)}

        if torch.cuda.is_available():
            ours_patch_scores(images[0], device="cuda")  # warm-up
            gpu, t_gpu, _ = timed(lambda: [ours_patch_scores(im, device="cuda") for im in images])
            for r, g in zip(ref, gpu):
                np.testing.assert_allclose(g, r, rtol=0, atol=1e-12)
            per_image["ours_gpu"] = t_gpu / len(images)
        for mode, seconds in per_image.items():
            emit(bench="glcm", prop="entropy", size=f"{size}x{size}", images=len(images), mode=mode,
                 s_per_image=round(seconds, 4), us_per_patch=round(seconds * len(images) / n_patches * 1e6, 1),
                 speedup_vs_reference=round(per_image["reference_1proc"] / seconds, 2), within_1e12=True)
        emit(bench="glcm", prop="entropy", size=f"{size}x{size}", mode="ours_1proc", metric="cpu_time",
             cpu_s_per_image_reference=round(cpu_ref / len(images), 4), cpu_s_per_image=round(cpu_one / len(images), 4),
             cpu_speedup_vs_reference=round(cpu_ref / cpu_one, 2))

    # A graycoprops feature: one 2048² image, bit-exact rounding to 4 decimals.
    image, halves = IMAGES[-1], [(-1, "contrast", slice(0, 1024)), (-1, "contrast", slice(1024, None))]
    ref, t_ref, cpu_ref = timed(reference_patch_scores, image, "contrast")
    ours, t_one, cpu_one = timed(ours_patch_scores, image, "contrast")
    pooled, t_pool, _ = timed(lambda: np.concatenate(pool.starmap(ours_by_index, halves)))
    assert np.array_equal(ours, ref) and np.array_equal(pooled, ref)
    for mode, seconds in (("reference_1proc", t_ref), ("ours_1proc", t_one), (f"ours_{args.workers}proc", t_pool)):
        emit(bench="glcm", prop="contrast", size="2048x2048", images=1, mode=mode, s_per_image=round(seconds, 4),
             speedup_vs_reference=round(t_ref / seconds, 2), identical=True)
    emit(bench="glcm", prop="contrast", size="2048x2048", mode="ours_1proc", metric="cpu_time",
         cpu_speedup_vs_reference=round(cpu_ref / cpu_one, 2))
    pool.close()
    if not torch.cuda.is_available():
        emit(bench="glcm", mode="ours_gpu", note="not measured: no GPU on this machine")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--images", type=int, default=2, help="Photos per size (at most 4).")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    return parser.parse_args(argv)


if __name__ == "__main__":
    exit_on_usage_error("python -m bench.bench_glcm", main, parse_args())
