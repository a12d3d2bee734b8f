"""compare.py at scale: 3 folders of N textured images (skimage photos, bicubic-upscaled, plus noise; PNG), the whole
run timed (per-image GLCM + CR, statistics, report) and extrapolated linearly to --target images when N is smaller;
and the FID-family bootstrap alone on --fid_images × 2048 features (FID; FID, FID∞ and KID; a paired difference),
against one scipy Fréchet distance in the same run.

    python -m bench.bench_compare [--images 60] [--size 2048] [--target 2000] [--root /tmp/bench_compare]
    python -m bench.bench_compare --images 2000 --distinct 100      # the full size, ≈ 4 GB of disk
    python -m bench.bench_compare --images 2000 --size 256          # the report's weight at 2,000 prompts, quickly

The report is then opened in headless chromium (when installed): the time to its 'load' event, the distinct image
files it loads, and the browser's peak memory. Thumbnails (256²) and crops (128²) are the same size for 256² and
2048² images, so --size 256 gives the full-size page's weight in minutes.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import scipy.linalg
from PIL import Image
from skimage import data

import bootstrap
import compare
from errors import HelpFormatter, exit_on_usage_error

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")


def make_folders(root, n, size, distinct=None, seed=0):
    """Folders a, b (a blurred by bicubic down/up-sampling), c (fresh noise); returns their paths. With `distinct`
    below n, image i of a folder is a hard link to its image i % distinct: n names, every one read, decoded and
    measured by compare.py, from `distinct` files' worth of disk."""
    rng = np.random.default_rng(seed)
    folders = [Path(root) / name for name in ("a", "b", "c")]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    bases = [np.asarray(Image.fromarray(getattr(data, p)()).convert("RGB").resize((size, size), Image.BICUBIC),
                        dtype=np.int16) for p in PHOTOS]
    distinct = n if distinct is None else min(distinct, n)
    for i in range(n):
        if i >= distinct:
            for folder in folders:
                os.link(folder / f"{i % distinct:05d}.png", folder / f"{i:05d}.png")
            continue
        base = bases[i % len(bases)]
        for k, folder in enumerate(folders):
            noisy = np.clip(base + rng.integers(-24, 25, base.shape), 0, 255).astype(np.uint8)
            image = Image.fromarray(noisy)
            if k == 1:
                image = image.resize((size // 2, size // 2), Image.BICUBIC).resize((size, size), Image.BICUBIC)
            image.save(folder / f"{i:05d}.png", compress_level=1)
    return folders


# Injected before the page's own script: after 'load', how long it took and whether every <img> with a source decoded.
ON_LOAD = """<script>window.addEventListener('load', function () {
  var imgs = Array.from(document.querySelectorAll('img')), r = {load_ms: Math.round(performance.now()),
    imgs: imgs.length, thumbs: document.querySelectorAll('img.thumb').length,
    files: new Set(imgs.map(function (i) { return i.getAttribute('src'); }).filter(Boolean)).size,
    broken: imgs.filter(function (i) { return i.getAttribute('src') && !(i.complete && i.naturalWidth > 0); }).length};
  var pre = document.createElement('pre'); pre.id = 'opened'; pre.textContent = JSON.stringify(r);
  document.body.appendChild(pre);
});</script>"""


def open_in_chromium(page, timeout):
    """Open the report in headless chromium until 'load': {load_ms, imgs, thumbs, files, broken, wall_s,
    memory_rise_gb}, or None without chromium. memory_rise_gb: the peak of the machine's memory in use (total minus
    available, sampled every 0.1 s) above its value before the start; it counts chromium's shared memory, which the
    processes' own sizes do not."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        return None
    probe = page.with_name("report_open.html")
    probe.write_text(page.read_text(encoding="utf-8").replace("<head>", "<head>" + ON_LOAD, 1), encoding="utf-8")
    in_use = lambda: psutil.virtual_memory().total - psutil.virtual_memory().available  # noqa: E731
    start, baseline, peak = time.perf_counter(), in_use(), [0]
    browser = subprocess.Popen([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1200,900",
                                "--dump-dom", probe.as_uri()], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True)

    def sample():
        while browser.poll() is None:
            peak[0] = max(peak[0], in_use() - baseline)
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        stdout, _ = browser.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        browser.kill()
        stdout = ""
    sampler.join()
    found = re.search(r'<pre id="opened">(.*?)</pre>', stdout, re.S)
    result = json.loads(found.group(1)) if found else {"load_ms": None, "timed_out_s": timeout}
    return {**result, "wall_s": round(time.perf_counter() - start, 1), "memory_rise_gb": round(peak[0] / 2 ** 30, 2)}


def time_fid_bootstrap(n, d, resamples):
    """{stage: seconds} on n × d features: one scipy sqrtm FID (the reference), fid_ci with `resamples` resamples, the
    whole FID family of one run (FID, FID∞, KID and their intervals) and a paired FID + KID difference of two runs."""
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(d, d)) * 0.995 ** np.arange(d)
    real, gen = np.abs(rng.normal(size=(n, d)) @ mixing.T), np.abs(rng.normal(size=(n, d)) @ mixing.T) * 1.05
    seconds = {}
    start = time.perf_counter()
    s1, s2 = np.cov(real, rowvar=False), np.cov(gen, rowvar=False)
    reference = float(((real.mean(0) - gen.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2)
                      - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real))
    seconds["one_scipy_fid"] = time.perf_counter() - start
    start = time.perf_counter()
    point, _ = bootstrap.fid_ci(real, gen, n_resamples=resamples, aligned=True)
    seconds["fid_ci"] = time.perf_counter() - start
    assert abs(point - reference) <= 1e-6 * abs(reference), (point, reference)
    start = time.perf_counter()
    bootstrap.fid_family(real, gen, n_resamples=resamples, aligned=True)
    seconds["fid_family"] = time.perf_counter() - start
    start = time.perf_counter()
    run = lambda generated: {"real": real, "generated": generated, "aligned": True}  # noqa: E731
    bootstrap.distance_differences(run(gen), run(gen * 1.01), n_resamples=resamples, paired=True)
    seconds["paired_difference"] = time.perf_counter() - start
    return seconds


def main(args):
    bootstrap.check_bootstrap(args.bootstrap)
    root = Path(args.root)
    shutil.rmtree(root, ignore_errors=True)
    start = time.perf_counter()
    folders = make_folders(root, args.images, args.size, args.distinct)
    print(json.dumps({"stage": "make_images", "folders": 3, "images": args.images, "size": args.size,
                      "distinct_files_per_folder": min(args.distinct or args.images, args.images),
                      "seconds": round(time.perf_counter() - start, 1)}))
    start = time.perf_counter()
    compare.main(compare.parse_args(["--folders", *map(str, folders), "--out", str(root / "out"),
                                     "--workers", str(args.workers), "--bootstrap", str(args.bootstrap)]))
    seconds = time.perf_counter() - start
    page = root / "out" / "report.html"
    files = [p for p in (root / "out").rglob("*") if p.is_file()]
    print(json.dumps({"stage": "compare", "folders": 3, "images": args.images, "size": args.size,
                      "workers": args.workers, "seconds": round(seconds, 1),
                      "seconds_per_image": round(seconds / (3 * args.images), 3),
                      f"extrapolated_seconds_{args.target}": round(seconds * args.target / args.images),
                      "report_html_kb": round(page.stat().st_size / 1024),
                      "report_files_mb": round(sum(p.stat().st_size for p in files) / 2 ** 20, 1),
                      "load_average_1min": os.getloadavg()[0]}))
    opened = open_in_chromium(page, args.open_timeout)
    print(json.dumps({"stage": "open_report", "prompts": args.images, "chromium": opened or "not installed",
                      "load_average_1min": os.getloadavg()[0]}))
    seconds = time_fid_bootstrap(args.fid_images, 2048, args.bootstrap)
    print(json.dumps({"stage": "fid_bootstrap", "images": args.fid_images, "features": 2048,
                      "resamples": args.bootstrap, **{k: round(v, 1) for k, v in seconds.items()},
                      "load_average_1min": os.getloadavg()[0]}))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--images", type=int, default=60, help="images per folder actually measured")
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--distinct", type=int, default=None,
                        help="distinct image files per folder (the rest are hard links to them; default: all)")
    parser.add_argument("--target", type=int, default=2000, help="images per folder the time is extrapolated to")
    parser.add_argument("--fid_images", type=int, default=2000, help="images per side of the FID bootstrap timing")
    parser.add_argument("--bootstrap", type=int, default=bootstrap.DEFAULT_RESAMPLES)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--root", default="/tmp/bench_compare", help="scratch folder (deleted at the end)")
    parser.add_argument("--keep", action="store_true", help="keep the images and the report")
    parser.add_argument("--open_timeout", type=int, default=900, help="seconds chromium may take to open the report")
    return parser.parse_args(argv)


if __name__ == "__main__":
    exit_on_usage_error("python -m bench.bench_compare", main, parse_args())
