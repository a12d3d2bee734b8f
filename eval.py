"""GLCM Score and Compression Ratio of a folder of images (the paper's detail metrics; detail_metrics.py)."""
import argparse
import math
import os
import warnings

import torch

from bootstrap import add_bootstrap_flags, add_intervals, check_bootstrap
from detail_metrics import GLCM_PROPS, evaluate_folder, write_outputs
import outputs
from errors import HelpFormatter, UsageError, check_at_least, exit_on_usage_error


def interval(bounds):
    """[low, high] to 4 significant digits ("undefined" when the JSON holds none)."""
    return "undefined" if bounds is None or None in bounds else f"[{bounds[0]:.4g}, {bounds[1]:.4g}]"


def print_table(summary, rows, max_rows=20):
    """The first images, then the two set-level figures."""
    print(f"{'file':40s} {'size':>11s} {'GLCM':>9s} {'CR':>7s}")
    for r in rows[:max_rows]:
        size = f"{r['width']:>5d}×{r['height']:<5d}"
        print(f"{r['file'][-40:]:40s} {size} {r['glcm']:9.4f} {r['compression_ratio']:7.2f}")
    if len(rows) > max_rows:
        print(f"... {len(rows) - max_rows} more in the CSV")
    print(f"GLCM Score ({summary['prop']}): {summary['glcm_score']:.6f}  "
          f"({summary['n_glcm_images']} images with a full {summary['patch_size']}×{summary['patch_size']} patch)")
    print(f"Compression Ratio ({summary['cr_mode']}, q{summary['jpeg_quality']}): {summary['compression_ratio']:.4f}  "
          f"({summary['n_images']} images, {summary['n_skipped']} skipped)")
    if summary.get("bootstrap"):
        print(f"95% intervals ({summary['bootstrap']} resamples): GLCM {interval(summary['glcm_score_ci95'])}, "
              f"CR {interval(summary['compression_ratio_ci95'])}")


def main(args):
    """Measure every image of --img_root; write the per-image CSV and the summary JSON; print a table."""
    # Check the flags:
    warnings.formatwarning = lambda message, *rest, **kw: f"warning: {message}\n"  # no source line in a CLI
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was given but torch sees no GPU; use --device cpu")
    check_bootstrap(args.bootstrap)
    if not os.path.isdir(args.img_root):
        raise UsageError(f"--img_root {args.img_root!r} is not a folder")
    if not 1 <= args.jpeg_quality <= 100:
        raise UsageError(f"--jpeg_quality must be from 1 to 100 (paper: 95), got {args.jpeg_quality}.")
    check_at_least(1, patch_size=args.patch_size, workers=args.workers, size=args.size)
    stem = os.path.normpath(args.img_root)
    csv_path = args.output_csv or f"{stem}_eval.csv"
    json_path = args.output_json or f"{stem}_eval.json"
    outputs.make_writable_folder(os.path.dirname(os.path.abspath(csv_path)), "--output_csv")
    json_folder, json_name = os.path.split(os.path.abspath(json_path))

    # Measure every image (one run at a time writes these outputs):
    with outputs.FolderLock(json_folder, "--output_json", name=f".{json_name}.lock"):
        summary, rows = evaluate_folder(args.img_root, prop=args.prop, patch_size=args.patch_size, device=args.device,
                                        workers=args.workers, cr_mode=args.cr_mode, quality=args.jpeg_quality,
                                        recursive=args.recursive, size=args.size)  # UsageError: empty or unreadable
        add_intervals(summary, args.bootstrap, args.bootstrap_seed, means={"glcm_score": [r["glcm"] for r in rows]},
                      ratios={"compression_ratio": ([r["raw_bytes"] for r in rows],
                                                    [r["compressed_bytes"] for r in rows])})
        write_outputs(summary, rows, csv_path, json_path)

    # Report:
    print_table(summary, rows)
    if math.isnan(summary["glcm_score"]):
        print(f"No image holds a {args.patch_size}×{args.patch_size} patch: the GLCM Score is undefined (null).")
    print(f"Per-image CSV: {csv_path}\nSummary JSON: {json_path}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--img_root", type=str, required=True, help="Folder of images to measure.")
    parser.add_argument("--prop", type=str, default="entropy", choices=GLCM_PROPS,
                        help="Patch score: shannon_entropy of the GLCM (the paper) or a graycoprops feature.")
    parser.add_argument("--patch_size", type=int, default=64, help="GLCM patch size (paper: 64).")
    parser.add_argument("--size", type=int, default=None,
                        help="Accepted for the authors' command line, which assumed size×size images. Every "
                             "image is measured at its own size; given, only warns about images of another size.")
    parser.add_argument("--recursive", action="store_true", help="Also measure images in sub-folders.")
    parser.add_argument("--cr_mode", type=str, default="encode", choices=["encode", "file"],
                        help="Compression Ratio denominator: an in-memory Pillow JPEG of each image (paper), or "
                             "the size of the file on disk (the authors' code, valid for their q95 JPEGs).")
    parser.add_argument("--jpeg_quality", type=int, default=95, help="JPEG quality of --cr_mode encode (paper: 95).")
    parser.add_argument("--device", type=str, default="cpu", help="cpu or cuda: where the GLCMs are counted.")
    parser.add_argument("--workers", type=int, default=os.cpu_count(),
                        help="Processes reading (and, on cpu, scoring) images; default: all cores.")
    add_bootstrap_flags(parser)
    parser.add_argument("--output_csv", type=str, default=None, help="Per-image CSV (default: <img_root>_eval.csv).")
    parser.add_argument("--output_json", type=str, default=None, help="Summary JSON (default: <img_root>_eval.json).")
    return parser.parse_args(argv)


if __name__ == "__main__":
    exit_on_usage_error("eval.py", main, parse_args())
