"""What the detail measures of `prepare_data.py filter` read on pictures everyone knows: GLCM Score, Compression Ratio
and flat share (scores.csv's columns, computed by prepare_data.score_image) of ordinary photos at their native size,
the same photos upscaled to 4K, flat images and noise. A threshold is read against these: it should keep the photos
and drop the flat images.

    python -m bench.bench_detail_values [--size 4096]

One JSON line per image (group, name, size, the three measures), then one per group (min / median / max).
"""
import argparse
import json
import statistics

import numpy as np
from PIL import Image
from skimage import data

from errors import HelpFormatter, exit_on_usage_error
from prepare_data import score_image

PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "coins", "hubble_deep_field", "immunohistochemistry", "moon",
          "retina", "rocket", "stereo_motorcycle")  # every photograph scikit-image ships (no download)
MEASURES = ("glcm", "compression_ratio", "flat_share")


def photo(name):
    """A scikit-image photograph as uint8 RGB at its native size (grey ones replicated to three channels)."""
    image = getattr(data, name)()
    image = image[0] if name == "stereo_motorcycle" else image  # (left, right, disparity): the left view
    return np.asarray(Image.fromarray(image).convert("RGB"))


def upscaled(rgb, long_side):
    """`rgb` resized (bicubic) so that its long side is `long_side`, aspect ratio kept."""
    h, w = rgb.shape[:2]
    scale = long_side / max(h, w)
    return np.asarray(Image.fromarray(rgb).resize((round(w * scale), round(h * scale)), Image.Resampling.BICUBIC))


def synthetic(size, seed=0):
    """{name: uint8 RGB size x size}: flat images (a uniform grey, a grey card with sensor noise of sigma 1, a
    smooth left-to-right gradient) and noise (uniform on 0..255 per channel, Gaussian sigma 20 around mid-grey)."""
    rng = np.random.default_rng(seed)
    grey = np.full((size, size, 3), 128, np.uint8)
    ramp = np.broadcast_to(np.linspace(0, 255, size).round().astype(np.uint8)[None, :, None], (size, size, 3))
    return {
        "flat": {"uniform grey": grey,
                 "grey card, noise sigma 1": np.clip(128 + rng.normal(0, 1, (size, size, 1)), 0, 255).round()
                 .astype(np.uint8).repeat(3, axis=2),
                 "gradient 0-255": np.ascontiguousarray(ramp)},
        "noise": {"uniform noise": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
                  "Gaussian noise sigma 20": np.clip(128 + rng.normal(0, 20, (size, size, 3)), 0, 255).round()
                  .astype(np.uint8)},
    }


def emit(**fields):
    """One JSON line."""
    print(json.dumps(fields), flush=True)


def main(args):
    groups = {"photo, native size": {name: photo(name) for name in PHOTOS}}
    groups[f"photo, upscaled to {args.size}"] = {name: upscaled(rgb, args.size)
                                                 for name, rgb in groups["photo, native size"].items()}
    groups.update({f"{kind}, {args.size}²": images for kind, images in synthetic(args.size).items()})
    emit(bench="detail_values", note="prepare_data.score_image (filter's scores.csv), flat_std 2.0")
    for group, images in groups.items():
        scores = {}
        for name, rgb in images.items():
            scores[name] = score_image(np.ascontiguousarray(rgb), flat_std=2.0)
            emit(group=group, name=name, size=f"{rgb.shape[1]}x{rgb.shape[0]}",
                 **{key: round(scores[name][key], 4) for key in MEASURES})
        emit(group=group, images=len(images), **{
            key: {"min": round(min(s[key] for s in scores.values()), 4),
                  "median": round(statistics.median(s[key] for s in scores.values()), 4),
                  "max": round(max(s[key] for s in scores.values()), 4)} for key in MEASURES})


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--size", type=int, default=4096, help="the long side of the upscaled photos, the side of "
                                                                "the flat and noise images")
    return parser.parse_args(argv)


if __name__ == "__main__":
    exit_on_usage_error("python -m bench.bench_detail_values", main, parse_args())
