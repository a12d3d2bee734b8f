"""Compare runs made from the same prompts and seeds: every metric with its 95 % interval, and each pair's difference.

    python compare.py --folders runs/sd3 runs/sd3_wlf --labels base wlf --out comparison/

Images are paired by file name. Per-image metrics (GLCM Score, Compression Ratio, and CLIPScore / Aesthetics when
generate_and_eval_fid.py scored the folder) are read from the folder's per_image.csv or eval.py's <folder>_eval.csv,
or measured here; differences resample the pairs together. FID and patch-FID come from the features.npz that
generate_and_eval_fid.py saves; their differences resample each set on its own. Writes DIR/comparison.json,
DIR/comparison.csv (the table printed here) and DIR/report.html (report.py).
"""
import argparse
import csv
import math
import os
from itertools import combinations
from pathlib import Path

import numpy as np

import detail_metrics
import outputs
import report
from bootstrap import (add_bootstrap_flags, fid_ci, fid_difference, json_interval, mean_ci, paired_difference,
                       ratio_ci)
from errors import UsageError, exit_on_usage_error
from imagefolder import IMAGE_SUFFIXES, list_folder_images
from patch_fid import FEATURES_FILE, load_features

MEAN_METRICS = ("glcm_score", "clip_score", "aesthetics")  # mean over images
FID_METRICS = {"fid": ("inception_real", "inception_generated"), "patch_fid": ("patch_real", "patch_generated")}
CSV_COLUMNS = ("kind", "a", "b", "metric", "value", "ci95_low", "ci95_high", "n", "significant")


#################################################################################
#                               Reading a folder                                #
#################################################################################

def read_csv(path):
    """Rows of a CSV as dicts of strings."""
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def per_image_metrics(folder, names, workers, cache_csv):
    """({file: {metric: value, "raw_bytes", "compressed_bytes", ["prompt"]}}, where they came from)."""
    folder = Path(folder)
    if (folder / "per_image.csv").is_file():  # generate_and_eval_fid.py
        rows = {}
        for row in read_csv(folder / "per_image.csv"):
            values = {k: float(row[k]) for k in ("glcm_score", "clip_score", "aesthetics") if row.get(k)}
            if row.get("compression_ratio"):
                raw = float(row["raw_bytes"])
                values.update(raw_bytes=raw, compressed_bytes=raw / float(row["compression_ratio"]))
            rows[row["file"]] = {**values, "prompt": row.get("prompt", "")}
        if all(rows.get(name, {}).get("glcm_score") is not None for name in names):
            return rows, str(folder / "per_image.csv")
    eval_csv = Path(f"{os.path.normpath(folder)}_eval.csv")
    source = eval_csv
    if eval_csv.is_file():  # eval.py
        table = read_csv(eval_csv)
    else:
        _, table = detail_metrics.evaluate_folder(str(folder), workers=workers)
        detail_metrics.write_outputs({}, table, cache_csv, os.devnull)
        source = f"measured here ({cache_csv})"
    rows = {os.path.basename(row["file"]): {"glcm_score": float(row["glcm"]), "raw_bytes": float(row["raw_bytes"]),
                                             "compressed_bytes": float(row["compressed_bytes"])} for row in table}
    return rows, str(source)


def load_run(index, folder, label, out_dir, workers):
    """Everything compare needs of one folder (the index-th): images, per-image metrics, features."""
    if not Path(folder).is_dir():
        raise UsageError(f"--folders {folder!r} is not a folder")
    images = list_folder_images(folder)
    if not images:
        raise UsageError(f"--folders {folder!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    cache = Path(out_dir) / "measured" / f"{index}.csv"  # GLCM and CR measured here, when the folder has none
    rows, source = per_image_metrics(folder, list(images), workers, cache)
    if source.endswith("per_image.csv"):  # generate_and_eval_fid.py's own images (not its --protocol authors JPEGs)
        images = {name: path for name, path in images.items() if name in rows}
    return {"label": label, "folder": str(folder), "images": images, "rows": rows, "source": source,
            "features": load_features(Path(folder) / FEATURES_FILE)}


#################################################################################
#                                   Statistics                                  #
#################################################################################

def metric_names(run):
    """The per-image metrics a run has for every image, and its FID-family metrics."""
    rows = [run["rows"].get(name, {}) for name in run["images"]]
    means = [m for m in MEAN_METRICS if rows and all(m in row for row in rows)]
    ratio = ["compression_ratio"] if rows and all("compressed_bytes" in row for row in rows) else []
    fids = [m for m, keys in FID_METRICS.items() if all(k in run["features"] for k in keys)]
    return means + ratio + fids


def patch_groups(features, key):
    """The image index of each patch row (patches come in equal runs per image, in file order)."""
    n_images, n_rows = len(features["files"]), len(features[key])
    return np.repeat(np.arange(n_images), n_rows // n_images) if n_images and n_rows % n_images == 0 else None


def folder_summary(run, metrics, n_resamples, seed):
    """{metric: {"value", "ci95"}} over all of a folder's images."""
    rows = [run["rows"][name] for name in run["images"] if name in run["rows"]]
    out = {}
    for metric in metrics:
        if metric in MEAN_METRICS:
            values = [row[metric] for row in rows]
            value, ci = float(np.nanmean(values)), mean_ci(values, n_resamples, seed)
        elif metric == "compression_ratio":
            raw, comp = [row["raw_bytes"] for row in rows], [row["compressed_bytes"] for row in rows]
            value, ci = sum(raw) / sum(comp), ratio_ci(raw, comp, n_resamples, seed)
        else:
            real, gen = (run["features"][k] for k in FID_METRICS[metric])
            groups = patch_groups(run["features"], FID_METRICS[metric][1]) if metric == "patch_fid" else None
            value, ci = fid_ci(real, gen, n_resamples, seed, real_groups=groups, gen_groups=groups)
        out[metric] = {"value": None if math.isnan(value) else float(value), "ci95": json_interval(ci)}
    return out


def pair_rows(run_a, run_b, metrics, paired, n_resamples, seed):
    """The "pairs" entries of one pair of runs: b − a per metric both have."""
    out = []
    for metric in [m for m in metrics if m in metric_names(run_b)]:
        if metric in FID_METRICS:
            keys = FID_METRICS[metric]
            fa, fb = run_a["features"], run_b["features"]
            groups = ((None,) * 4 if metric == "fid" else
                      (patch_groups(fa, keys[1]),) * 2 + (patch_groups(fb, keys[1]),) * 2)
            diff, ci = fid_difference(fa[keys[0]], fa[keys[1]], fb[keys[0]], fb[keys[1]], n_resamples, seed,
                                      groups=groups)
        else:
            a = [run_a["rows"][name] for name in paired]
            b = [run_b["rows"][name] for name in paired]
            if metric == "compression_ratio":
                diff, ci = paired_difference([r["raw_bytes"] for r in a], [r["raw_bytes"] for r in b], n_resamples,
                                             seed, denominators=([r["compressed_bytes"] for r in a],
                                                                 [r["compressed_bytes"] for r in b]))
            else:
                diff, ci = paired_difference([r[metric] for r in a], [r[metric] for r in b], n_resamples, seed)
        ci = json_interval(ci)
        significant = None not in ci and (ci[0] > 0 or ci[1] < 0)
        out.append({"a": run_a["label"], "b": run_b["label"], "metric": metric, "difference": float(diff),
                    "ci95": ci, "n_pairs": len(paired), "significant": bool(significant)})
    return out


def compare(runs, n_resamples, seed):
    """(comparison dict in the documented shape, paired file names, {label: unpaired file names})."""
    common = set.intersection(*(set(run["images"]) for run in runs))
    paired = sorted(name for name in common if all(name in run["rows"] for run in runs))
    if not paired:
        raise UsageError("no image file name is in every folder: compare needs folders made from the same prompts "
                         "(images paired by file name)")
    unpaired = {run["label"]: sorted(set(run["images"]) - set(paired)) for run in runs}
    names = {run["label"]: metric_names(run) for run in runs}
    comparison = {"folders": {run["label"]: folder_summary(run, names[run["label"]], n_resamples, seed)
                              for run in runs}, "pairs": []}
    for run_a, run_b in combinations(runs, 2):
        comparison["pairs"] += pair_rows(run_a, run_b, names[run_a["label"]], paired, n_resamples, seed)
    return comparison, paired, unpaired


#################################################################################
#                                    Output                                     #
#################################################################################

def table_rows(comparison):
    """The CSV / terminal rows: one per folder metric, one per pair metric."""
    rows = [{"kind": "folder", "a": label, "b": "", "metric": metric, "value": v["value"], "ci95_low": v["ci95"][0],
             "ci95_high": v["ci95"][1], "n": "", "significant": ""}
            for label, metrics in comparison["folders"].items() for metric, v in metrics.items()]
    rows += [{"kind": "pair", "a": p["a"], "b": p["b"], "metric": p["metric"], "value": p["difference"],
              "ci95_low": p["ci95"][0], "ci95_high": p["ci95"][1], "n": p["n_pairs"], "significant": p["significant"]}
             for p in comparison["pairs"]]
    return rows


def format_number(value):
    """A table cell: 4 significant digits, '-' for none."""
    return "-" if value is None or value == "" else f"{value:.4g}" if isinstance(value, float) else str(value)


def print_table(rows, unpaired):
    """The comparison as a plain-text table."""
    print(f"{'kind':6s} {'a':14s} {'b':14s} {'metric':18s} {'value':>10s} {'95% interval':>22s} {'n':>6s} sig")
    for r in rows:
        interval = f"[{format_number(r['ci95_low'])}, {format_number(r['ci95_high'])}]"
        mark = "" if r["kind"] == "folder" else ("*" if r["significant"] else "n.s.")
        print(f"{r['kind']:6s} {r['a'][:14]:14s} {r['b'][:14]:14s} {r['metric']:18s} {format_number(r['value']):>10s} "
              f"{interval:>22s} {format_number(r['n']):>6s} {mark}")
    for label, names in unpaired.items():
        if names:
            print(f"{label}: {len(names)} image(s) without a match in every folder, left out of paired differences "
                  f"(e.g. {names[0]})")


def main(args):
    if len(args.folders) < 2:
        raise UsageError("--folders needs at least two folders to compare")
    labels = args.labels or [Path(os.path.normpath(f)).name for f in args.folders]
    if len(labels) != len(args.folders) or len(set(labels)) != len(labels):
        raise UsageError(f"--labels: give one distinct label per folder ({len(args.folders)}), got {labels}")
    if args.bootstrap < 1:
        raise UsageError("--bootstrap: compare needs at least 1 resample (1000 is the default)")
    with outputs.FolderLock(args.out, "--out"):  # one run per --out folder
        return run(args, labels)


def run(args, labels):
    """Measure each folder, compare every pair, write the table, the JSON, the CSV and the report."""
    out = Path(args.out)
    (out / "measured").mkdir(parents=True, exist_ok=True)
    runs = [load_run(i, folder, label, out, args.workers)
            for i, (folder, label) in enumerate(zip(args.folders, labels))]
    comparison, paired, unpaired = compare(runs, args.bootstrap, args.bootstrap_seed)
    rows = table_rows(comparison)
    outputs.write_json(out / "comparison.json", comparison)
    outputs.write_csv(out / "comparison.csv", rows, CSV_COLUMNS)
    outputs.write_json(out / "unpaired.json", unpaired)
    print_table(rows, unpaired)
    if not args.no_report:
        page = report.write_report(out, runs, comparison, paired, unpaired, thumb_size=args.thumb_size,
                                   crop_size=args.crop_size, workers=args.workers)
        print(f"Report: {page}")
    print(f"Comparison: {out / 'comparison.json'}, {out / 'comparison.csv'}")
    return comparison


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folders", nargs="+", required=True, help="two or more folders of images, same file names")
    parser.add_argument("--labels", nargs="+", default=None, help="a name per folder (default: the folder names)")
    parser.add_argument("--out", required=True, help="output folder: comparison.json/.csv, report.html and its files")
    add_bootstrap_flags(parser)
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="processes measuring images")
    parser.add_argument("--thumb_size", type=int, default=256, help="longest side of the report's thumbnails")
    parser.add_argument("--crop_size", type=int, default=128, help="side of the report's 1:1 crops and zoom views")
    parser.add_argument("--no_report", action="store_true", help="only comparison.json and comparison.csv")
    return parser.parse_args(argv)


if __name__ == "__main__":
    exit_on_usage_error("compare.py", main, parse_args())
