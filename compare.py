"""Compare runs made from the same prompts and seeds: every metric with its 95 % interval, and each pair's difference.

    python compare.py --folders runs/sd3 runs/sd3_wlf --labels base wlf --out comparison/

Images are paired by file name. Per-image metrics (GLCM Score, Compression Ratio, and CLIPScore / Aesthetics when
generate_and_eval_fid.py scored the folder) are read from the folder's per_image.csv or eval.py's <folder>_eval.csv
(images they lack are measured here, with the settings they were measured with), or measured here; folder values and
differences use the images every folder has, pairs resampled together. FID, KID and their patch versions come from
the features.npz that generate_and_eval_fid.py saves: when two folders hold the same prompts, each resample draws the
prompts once for both runs and their reference. Every difference gets a bootstrap p-value and Holm's correction over
all of them. Writes DIR/comparison.json, DIR/comparison.csv (the table printed here) and DIR/report.html (report.py).
"""
import argparse
import csv
import json
import math
import os
from itertools import combinations
from pathlib import Path

import numpy as np

import detail_metrics
import outputs
import report
from bootstrap import (ALPHA, FID_INF_FRACTIONS, add_bootstrap_flags, check_bootstrap, distance_differences, fid_family, holm,
                       holm_min_resamples, json_interval, mean_ci, p_value, paired_replicates, percentile_interval,
                       ratio_ci)
from errors import HelpFormatter, UsageError, exit_on_usage_error
from imagefolder import IMAGE_SUFFIXES, list_folder_images
from patch_fid import FEATURES_FILE, load_features

MEAN_METRICS = ("glcm_score", "clip_score", "aesthetics")  # mean over images
MODEL_METRICS = ("clip_score", "aesthetics")  # need the metric models: read from per_image.csv, never measured here
FID_METRICS = {"fid": ("inception_real", "inception_generated"), "patch_fid": ("patch_real", "patch_generated")}
KID_OF = {"fid": "kid", "patch_fid": "patch_kid"}
CSV_COLUMNS = ("kind", "a", "b", "metric", "value", "ci95_low", "ci95_high", "n", "significant", "p_value",
               "significant_holm", "paired")
DETAIL_SETTINGS = ("prop", "patch_size", "cr_mode", "jpeg_quality", "detail_images")  # change GLCM Score and CR
MEASURED_HERE = {"prop": "entropy", "patch_size": 64, "cr_mode": "encode", "jpeg_quality": 95,
                 "detail_images": "the images"}
AUTHORS_DETAIL = {**MEASURED_HERE, "cr_mode": "file", "detail_images": "their q95 JPEG files (--protocol authors)"}


#################################################################################
#                               Reading a folder                                #
#################################################################################

def read_csv(path):
    """Rows of a CSV as dicts of strings."""
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def read_per_image_csv(folder):
    """(rows {file: values}, detail settings) of generate_and_eval_fid.py's per_image.csv and metrics.json, or None."""
    path, metrics = folder / "per_image.csv", folder / "metrics.json"
    if not path.is_file():
        return None
    if not metrics.is_file():
        raise UsageError(f"{path} has no metrics.json beside it, so compare cannot tell how its metrics were "
                         f"measured: rerun generate_and_eval_fid.py --skip_generation --save_path {folder}.")
    authors = json.loads(metrics.read_text()).get("settings", {}).get("protocol") == "authors"
    rows = {}
    for row in read_csv(path):
        values = {k: float(row[k]) for k in MEAN_METRICS if row.get(k)}
        if row.get("compression_ratio"):
            raw = float(row["raw_bytes"])
            values.update(raw_bytes=raw, compressed_bytes=raw / float(row["compression_ratio"]))
        rows[row["file"]] = {**values, "prompt": row.get("prompt", "")}
    return rows, AUTHORS_DETAIL if authors else MEASURED_HERE


def read_eval_csv(folder):
    """(rows {file: values}, detail settings) of eval.py's <folder>_eval.csv and <folder>_eval.json, or None."""
    stem = os.path.normpath(folder)
    path, summary = Path(f"{stem}_eval.csv"), Path(f"{stem}_eval.json")
    if not path.is_file():
        return None
    if not summary.is_file():
        raise UsageError(f"{path} has no {summary.name} beside it, so compare cannot tell which settings measured it: "
                         f"rerun eval.py --img_root {folder}, or remove {path} to have compare measure the folder.")
    saved = json.loads(summary.read_text())
    settings = {**MEASURED_HERE, **{k: saved[k] for k in DETAIL_SETTINGS[:-1]}}
    rows = {os.path.basename(row["file"]): {"glcm_score": float(row["glcm"]), "raw_bytes": float(row["raw_bytes"]),
                                            "compressed_bytes": float(row["compressed_bytes"])} for row in read_csv(path)}
    return rows, settings


def sorted_features(path, images):
    """The folder's features.npz with its rows in file-name order (a reference with one row per image, or one run of
    crops per image, follows its image); UsageError when its `files` are not the folder's images."""
    features = load_features(path)
    if not features:
        return {}
    files = [str(f) for f in features.get("files", [])]
    if sorted(files) != sorted(images):
        extra, missing = sorted(set(files) - set(images)), sorted(set(images) - set(files))
        raise UsageError(f"{path} does not describe the images of {path.parent}: {len(missing)} image(s) not in it "
                         f"(e.g. {(missing or ['-'])[0]}), {len(extra)} entry(ies) without an image (e.g. "
                         f"{(extra or ['-'])[0]}); rerun generate_and_eval_fid.py --skip_generation there, or remove "
                         f"{path.name}.")
    order = np.argsort(files, kind="stable")
    out = {"files": np.array(files)[order]}
    for key, rows in features.items():
        per_image = len(rows) // len(files) if len(rows) % len(files) == 0 else 0
        if key.endswith("_generated") and not per_image:
            raise UsageError(f"{path}: {key} has {len(rows)} rows for {len(files)} images (not a whole number per "
                             f"image); rerun generate_and_eval_fid.py --skip_generation there.")
        if key != "files":
            out[key] = rows[(order[:, None] * per_image + np.arange(per_image)).ravel()] if per_image else rows
    return out


def model_values(folder, images, per_image_rows):
    """{image: its CLIPScore, Aesthetics and prompt from per_image.csv}; UsageError when the CSV has a metric for some
    of the folder's images and not for others (compare cannot measure them: they need the metric models)."""
    rows = {name: {k: v for k, v in per_image_rows.get(name, {}).items() if k in MODEL_METRICS or k == "prompt"}
            for name in images}
    for metric in MODEL_METRICS:
        lacking = [name for name in images if metric not in rows[name]]
        if 0 < len(lacking) < len(images):
            raise UsageError(f"{folder / 'per_image.csv'} has no {metric} for {len(lacking)} of the folder's images "
                             f"(e.g. {lacking[0]}), which compare cannot measure: rerun generate_and_eval_fid.py "
                             f"--skip_generation --save_path {folder}, or move those images out.")
    return rows


def load_run(folder, label):
    """What compare needs of one folder, read without measuring anything: its images, their per-image values, where
    those come from and the settings that measured them, the images to measure here, its sorted features."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"--folders {str(folder)!r} is not a folder")
    images = list_folder_images(folder)
    per_image = read_per_image_csv(folder)
    if per_image and per_image[1] == AUTHORS_DETAIL:  # NNNNN.jpg beside NNNNN.png: that image's q95 copy
        images = {n: p for n, p in images.items() if not (p.suffix == ".jpg" and p.with_suffix(".png").name in images)}
    if not images:
        raise UsageError(f"--folders {str(folder)!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    rows = model_values(folder, images, per_image[0] if per_image else {})
    detail = (per_image if per_image and any("glcm_score" in r for r in per_image[0].values())
              else read_eval_csv(folder))
    source = str(folder / "per_image.csv") if detail is per_image else f"{os.path.normpath(folder)}_eval.csv"
    detail_rows, settings = detail or ({}, MEASURED_HERE)
    for name in images:
        if "glcm_score" in detail_rows.get(name, {}):
            rows[name].update({k: detail_rows[name][k] for k in ("glcm_score", "raw_bytes", "compressed_bytes")})
    missing = [name for name in images if "glcm_score" not in rows[name]]
    return {"label": label, "folder": str(folder), "images": images, "rows": rows, "settings": settings,
            "source": source if detail else None, "missing": missing,
            "features": sorted_features(folder / FEATURES_FILE, images)}


def check_settings(runs):
    """UsageError naming the folders and the setting when their GLCM Score / Compression Ratio were measured
    differently (paths, devices and bootstrap settings do not change them, so they are not compared)."""
    for key in DETAIL_SETTINGS:
        if len({str(run["settings"][key]) for run in runs}) > 1:
            values = ", ".join(f"{run['folder']}: {run['settings'][key]}" for run in runs)
            raise UsageError(f"the folders' GLCM Score and Compression Ratio were measured with different {key} "
                             f"({values}); score them alike (e.g. eval.py with the same flags) before comparing.")


def measure_missing(run, cache_csv, workers):
    """Measure, with the run's settings, the images its CSV lacks (every image without one); the source says so."""
    if not run["missing"]:
        return
    settings, folder = run["settings"], Path(run["folder"])
    paths = [run["images"][name] for name in run["missing"]]
    if settings == AUTHORS_DETAIL:
        paths = [path.with_suffix(".jpg") for path in paths]
        absent = [path for path in paths if not path.is_file()]
        if absent:
            raise UsageError(f"{absent[0]} is missing: --protocol authors measures each image's q95 JPEG copy; rerun "
                             f"generate_and_eval_fid.py --skip_generation --save_path {folder}.")
    _, table = detail_metrics.evaluate_folder(str(folder), prop=settings["prop"], patch_size=settings["patch_size"],
                                              workers=workers, cr_mode=settings["cr_mode"],
                                              quality=settings["jpeg_quality"], files=paths)
    outputs.write_csv(cache_csv, table, detail_metrics.CSV_FIELDS)  # measured/ made only when it has something
    name_of = {path.name: name for path, name in zip(paths, run["missing"])}
    for row in table:
        run["rows"][name_of[os.path.basename(row["file"])]].update(
            glcm_score=float(row["glcm"]), raw_bytes=float(row["raw_bytes"]),
            compressed_bytes=float(row["compressed_bytes"]))
    for name in run["missing"]:  # unreadable (evaluate_folder warned): no values, so left out like an unpaired image
        if "glcm_score" not in run["rows"][name]:
            del run["rows"][name]
    if run["source"]:
        run["note"] = (f"{run['source']} lacks {len(paths)} of the folder's images (e.g. {run['missing'][0]}): "
                       f"measured here with its settings ({cache_csv})")
        run["source"] = f"{run['source']}, and {len(paths)} image(s) it lacks measured here ({cache_csv})"
    else:
        run["source"] = f"measured here ({cache_csv})"


#################################################################################
#                                   Statistics                                  #
#################################################################################

def metric_names(run, images):
    """The per-image metrics a run has for every one of `images`, and its FID-family metrics."""
    rows = [run["rows"][name] for name in images]
    means = [m for m in MEAN_METRICS if rows and all(m in row for row in rows)]
    ratio = ["compression_ratio"] if rows and all("compressed_bytes" in row for row in rows) else []
    return means + ratio + [family for family in FID_METRICS if family_features(run["features"], family)]


def family_features(features, family):
    """{"real", "generated", "real_groups", "gen_groups", "aligned"} of FID or patch-FID, or None. Rows come in
    equal runs per image, in file order: one each for FID, the crops of an image for patch-FID; aligned: the
    reference holds the prompts' own images (as many rows as the generated set)."""
    real_key, gen_key = FID_METRICS[family]
    if real_key not in features or gen_key not in features:
        return None
    n = len(features["files"])
    groups = lambda rows: np.repeat(np.arange(n), len(rows) // n) if len(rows) % n == 0 else None  # noqa: E731
    real, gen = features[real_key], features[gen_key]
    return {"real": real, "generated": gen, "real_groups": groups(real), "gen_groups": groups(gen),
            "aligned": len(real) == len(gen)}


def per_image_entry(metric, rows, n_resamples, seed):
    """{"value", "ci95", "n"} of a per-image metric over `rows` (n: the images its value used)."""
    if metric == "compression_ratio":
        raw, comp = [row["raw_bytes"] for row in rows], [row["compressed_bytes"] for row in rows]
        value, ci, n = sum(raw) / sum(comp), ratio_ci(raw, comp, n_resamples, seed), len(rows)
    else:
        values = np.array([row[metric] for row in rows], dtype=np.float64)
        n = int((~np.isnan(values)).sum())
        value, ci = float(np.nanmean(values)) if n else float("nan"), mean_ci(values, n_resamples, seed)
    return {"value": None if math.isnan(value) else float(value), "ci95": json_interval(ci), "n": n}


def folder_summary(run, metrics, paired, n_resamples, seed):
    """{metric: {"value", "ci95", "n", ...}}: per-image metrics over the paired images (over all of the folder's
    under "all_images" when those differ); FID, FID∞ and KID, patch-FID and patch-KID over the features' images."""
    out, everything = {}, sorted(name for name in run["images"] if name in run["rows"])
    for metric in [m for m in metrics if m not in FID_METRICS]:
        out[metric] = per_image_entry(metric, [run["rows"][name] for name in paired], n_resamples, seed)
        if everything != paired:
            out[metric]["all_images"] = per_image_entry(metric, [run["rows"][name] for name in everything],
                                                        n_resamples, seed)
    for family in [m for m in metrics if m in FID_METRICS]:
        features = family_features(run["features"], family)
        summary = fid_family(features["real"], features["generated"], n_resamples, seed, features["real_groups"],
                             features["gen_groups"], features["aligned"],
                             FID_INF_FRACTIONS if family == "fid" else None)  # as generate_and_eval_fid.py
        n, empty = len(run["features"]["files"]), [None, None]
        out[family] = {"value": summary["fid"], "ci95": summary.get("fid_ci95", empty), "n": n,
                       "bias": summary.get("fid_bias")}
        if "fid_inf" in summary:
            out["fid_inf"] = {"value": summary["fid_inf"], "ci95": summary.get("fid_inf_ci95", empty), "n": n,
                              "sizes": summary["fid_inf_sizes"], "seed": summary["fid_inf_seed"]}
        out[KID_OF[family]] = {"value": summary["kid"], "ci95": summary.get("kid_ci95", empty), "n": n}
    return out


def pair_row(run_a, run_b, metric, point, replicates, n_pairs, paired):
    """One "pairs" entry: b − a, its interval and p-value from the replicates the interval is read from."""
    ci = json_interval(percentile_interval(replicates))
    return {"a": run_a["label"], "b": run_b["label"], "metric": metric,
            "difference": None if math.isnan(point) else float(point), "ci95": ci, "n_pairs": n_pairs,
            "significant": bool(None not in ci and (ci[0] > 0 or ci[1] < 0)), "paired": paired,
            "p_value": p_value(replicates)}


def pair_rows(run_a, run_b, metrics, paired, n_resamples, seed):
    """The "pairs" entries of one pair of runs: b − a per metric both have (n_pairs: the pairs used, after pairs with
    a NaN are dropped; FID-family: the prompts, when the two folders hold the same ones, else 0: unpaired)."""
    out = []
    for metric in [m for m in metrics if m in metric_names(run_b, paired)]:
        if metric in FID_METRICS:
            fa, fb = family_features(run_a["features"], metric), family_features(run_b["features"], metric)
            same = np.array_equal(run_a["features"]["files"], run_b["features"]["files"])
            n_pairs = len(run_a["features"]["files"]) if same else 0
            for name, (point, replicates) in distance_differences(fa, fb, n_resamples, seed, paired=same).items():
                out.append(pair_row(run_a, run_b, metric if name == "fid" else KID_OF[metric], point, replicates,
                                    n_pairs, same))
            continue
        a, b = [run_a["rows"][name] for name in paired], [run_b["rows"][name] for name in paired]
        if metric == "compression_ratio":
            point, replicates, n_used = paired_replicates(
                [r["raw_bytes"] for r in a], [r["raw_bytes"] for r in b], n_resamples, seed,
                denominators=([r["compressed_bytes"] for r in a], [r["compressed_bytes"] for r in b]))
        else:
            point, replicates, n_used = paired_replicates([r[metric] for r in a], [r[metric] for r in b],
                                                          n_resamples, seed)
        out.append(pair_row(run_a, run_b, metric, point, replicates, n_used, True))
    return out


def compare(runs, n_resamples, seed):
    """(comparison dict in the documented shape, paired file names, {label: unpaired file names})."""
    common = set.intersection(*(set(run["images"]) for run in runs))
    paired = sorted(name for name in common if all(name in run["rows"] for run in runs))
    if not paired:
        raise UsageError("no image file name is in every folder: compare needs folders made from the same prompts "
                         "(images paired by file name)")
    unpaired = {run["label"]: sorted(set(run["images"]) - set(paired)) for run in runs}
    names = {run["label"]: metric_names(run, paired) for run in runs}
    comparison = {"folders": {run["label"]: folder_summary(run, names[run["label"]], paired, n_resamples, seed)
                              for run in runs}, "pairs": []}
    for run_a, run_b in combinations(runs, 2):
        comparison["pairs"] += pair_rows(run_a, run_b, names[run_a["label"]], paired, n_resamples, seed)
    for row, rejected in zip(comparison["pairs"], holm([p["p_value"] for p in comparison["pairs"]])):
        row["significant_holm"] = rejected
    m = sum(p["p_value"] is not None for p in comparison["pairs"])
    comparison["tests"] = {"m": m, "alpha": ALPHA, "bootstrap": n_resamples,
                           "holm_min_bootstrap": holm_min_resamples(m)}
    return comparison, paired, unpaired


#################################################################################
#                                    Output                                     #
#################################################################################

def table_rows(comparison):
    """The CSV / terminal rows: one per folder metric (and FID's bias), one per pair metric."""
    rows = []
    for label, metrics in comparison["folders"].items():
        for metric, v in metrics.items():
            rows.append({"kind": "folder", "a": label, "b": "", "metric": metric, "value": v["value"],
                         "ci95_low": v["ci95"][0], "ci95_high": v["ci95"][1], "n": v["n"], "significant": "",
                         "p_value": "", "significant_holm": "", "paired": ""})
            if v.get("bias") is not None:
                rows.append({**rows[-1], "metric": f"{metric}_bias", "value": v["bias"], "ci95_low": None,
                             "ci95_high": None})
    rows += [{"kind": "pair", "a": p["a"], "b": p["b"], "metric": p["metric"], "value": p["difference"],
              "ci95_low": p["ci95"][0], "ci95_high": p["ci95"][1], "n": p["n_pairs"], "significant": p["significant"],
              "p_value": p["p_value"], "significant_holm": p["significant_holm"], "paired": p["paired"]}
             for p in comparison["pairs"]]
    return rows


def format_number(value):
    """A table cell: 4 significant digits, '-' for none."""
    return "-" if value is None or value == "" else f"{value:.4g}" if isinstance(value, float) else str(value)


def print_table(rows, unpaired, tests, notes):
    """The comparison as a plain-text table, then what it left out and what its marks mean."""
    print(f"{'kind':6s} {'a':14s} {'b':14s} {'metric':18s} {'value':>10s} {'95% interval':>22s} {'n':>6s} "
          f"{'p':>8s} sig")
    for r in rows:
        interval = f"[{format_number(r['ci95_low'])}, {format_number(r['ci95_high'])}]"
        mark = "" if r["kind"] == "folder" else ("*" if r["significant"] else "n.s.") + (" H" if r["significant_holm"]
                                                                                      else "")
        print(f"{r['kind']:6s} {r['a'][:14]:14s} {r['b'][:14]:14s} {r['metric']:18s} {format_number(r['value']):>10s} "
              f"{interval:>22s} {format_number(r['n']):>6s} {format_number(r['p_value']):>8s} {mark}")
    for label, names in unpaired.items():
        if names:
            print(f"{label}: {len(names)} image(s) without a match in every folder, left out of the folder values and "
                  f"paired differences (e.g. {names[0]}; their values: all_images)")
    for note in notes:
        print(note)
    print(report.tests_sentence(tests))


def main(args):
    if len(args.folders) < 2:
        raise UsageError("--folders needs at least two folders to compare")
    labels = args.labels or [Path(os.path.normpath(f)).name for f in args.folders]
    if len(labels) != len(args.folders) or len(set(labels)) != len(labels):
        raise UsageError(f"--labels: give one distinct label per folder ({len(args.folders)}), got {labels}")
    check_bootstrap(args.bootstrap)
    with outputs.FolderLock(args.out, "--out"):  # one run per --out folder
        return run(args, labels)


def run(args, labels):
    """Read every folder (refusing bad input before any work), measure what no CSV holds, compare every pair, write
    the table, the JSON, the CSV and the report."""
    out = Path(args.out)
    runs = [load_run(folder, label) for folder, label in zip(args.folders, labels)]
    check_settings(runs)
    for index, one in enumerate(runs):  # GLCM and CR of the images no CSV holds, measured here
        measure_missing(one, out / "measured" / f"{index}.csv", args.workers)
    comparison, paired, unpaired = compare(runs, args.bootstrap, args.bootstrap_seed)
    rows = table_rows(comparison)
    outputs.write_json(out / "comparison.json", comparison)
    outputs.write_csv(out / "comparison.csv", rows, CSV_COLUMNS)
    outputs.write_json(out / "unpaired.json", unpaired)
    print_table(rows, unpaired, comparison["tests"], [one["note"] for one in runs if one.get("note")])
    if not args.no_report:
        page = report.write_report(out, runs, comparison, paired, unpaired, thumb_size=args.thumb_size,
                                   crop_size=args.crop_size, workers=args.workers)
        print(f"Report: {page}")
    print(f"Comparison: {out / 'comparison.json'}, {out / 'comparison.csv'}")
    return comparison


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
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
