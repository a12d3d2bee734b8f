"""VAE reconstruction benchmark (paper Table 2): NMSE, NRMSE, PSNR, SSIM, LPIPS and rFID of decode(encode(x)).

Each image: shorter side resized to --size (bilinear, antialiased), centre crop, [0, 1]; the latent is the posterior
mean, the decoded output is clamped. One image at a time (a 4096^2 image through the F=16 decoder fits), a row per
image in the CSV; a killed run resumes from it. Unreadable files and files that are not images are skipped and
counted. Every weight file is local: nothing is downloaded.
"""
import argparse
import csv
import json
import os
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import outputs
from bootstrap import add_bootstrap_flags, add_intervals, check_bootstrap, fid_ci, json_interval
from errors import HelpFormatter, UsageError, check_at_least, exit_on_usage_error
from fid_metrics import WEIGHT_SOURCES, check_metric_files, fid_tensor, load_fid
from imagefolder import list_images, load_image
from patch_fid import load_features, recorded_features, save_features
from partitioned_vae import VAE_MODES, is_f16_vae, load_vae
from reconstruction import add_lpips_flags, load_lpips, lpips_distance, pixel_metrics, reconstruct
from tiny_models import is_stand_in

EVAL_MODES = tuple(VAE_MODES)  # every mode reconstructs (f8_half only here)
METRICS = ("nmse", "nrmse", "psnr", "ssim", "lpips", "rfid")
PIXEL_METRICS = ("nmse", "nrmse", "psnr", "ssim")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Everything that changes a row: a resumed run must use the same values (--max_images only chooses which rows).
SETTINGS = ("vae", "vae_mode", "grid", "data_dir", "size", "metrics", "lpips_net", "fid_feature", "dtype")


#################################################################################
#                                     Images                                    #
#################################################################################

def list_eval_images(data_dir, max_images=None):
    """(names relative to data_dir, skipped): imagefolder.list_images, every file (an undecodable one is skipped
    and counted when it is read); the imagefolder's skipped lines go to `skipped`."""
    paths, problems = list_images(data_dir, f"--data_dir {data_dir}")
    skipped = [{"file": "metadata.jsonl", "reason": why} for why in problems]
    return [str(Path(path).relative_to(data_dir)) for path in paths[:max_images]], skipped


def read_image(path, size):
    """(uint8 tensor (3, size, size), None), or (None, why the file was skipped)."""
    try:
        return fid_tensor(load_image(path), size), None
    except Image.UnidentifiedImageError:
        return None, "not an image"
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        return None, f"unreadable ({' '.join(str(error).split())[:120]})"


class ImageFiles(torch.utils.data.Dataset):
    """(name, uint8 tensor or None, reason) per file; DataLoader workers decode the next images meanwhile."""

    def __init__(self, root, names, size):
        self.root, self.names, self.size = Path(root), names, size

    def __len__(self):
        return len(self.names)

    def __getitem__(self, i):
        return (self.names[i], *read_image(self.root / self.names[i], self.size))


#################################################################################
#                                 Resumable state                               #
#################################################################################

def read_rows(csv_path):
    """The per-image rows already written, with their numbers as floats (a row cut short by a kill is left out)."""
    return [{k: (v if k == "file" else float(v)) for k, v in row.items()} for row in outputs.read_csv_rows(csv_path)]


def write_rows(csv_path, rows, columns, mode="w"):
    """Write (mode "w", atomically) or append ("a") rows to the CSV, the header first in a new file, flushed."""
    if mode == "w":
        outputs.write_csv(csv_path, rows, columns)
        return
    new = not Path(csv_path).is_file()
    with open(csv_path, mode, newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        if new:
            writer.writeheader()
        writer.writerows(rows)
        handle.flush()
        os.fsync(handle.fileno())


def save_json(path, data):
    """Write JSON through a temporary file, so a killed run leaves the old file or the new one."""
    outputs.write_json(path, data)


def save_fid_state(path, fid, n_rows):
    """The FID sums after the first `n_rows` CSV rows (written through a temporary file)."""
    partial = Path(f"{path}.partial")
    torch.save({"rows": n_rows, "state": {name: getattr(fid, name) for name in fid._defaults}}, partial)
    os.replace(partial, path)


def load_fid_state(path, fid):
    """Restore the FID sums saved by `save_fid_state`; returns how many CSV rows they cover (0 without a file)."""
    if not Path(path).is_file():
        return 0
    saved = torch.load(path, map_location=fid.device, weights_only=True)
    for name, value in saved["state"].items():
        setattr(fid, name, value)
    return saved["rows"]


def check_resume(output_json, settings, csv_path):
    """Refuse to add rows to a CSV written with other settings, or one of unknown settings."""
    if not Path(csv_path).is_file():
        return
    if not Path(output_json).is_file():
        raise UsageError(f"{csv_path} exists but {output_json} does not, so its settings are unknown: delete the CSV "
                         f"to start over, or pass the --output_json it was written with.")
    saved = json.loads(Path(output_json).read_text())
    changed = [f"{key}: {saved.get(key)!r} -> {settings[key]!r}" for key in SETTINGS if saved.get(key) != settings[key]]
    if changed:
        raise UsageError(f"{csv_path} holds rows computed with other settings ({'; '.join(changed)}). Use another "
                         f"--output_json, or delete {csv_path} and {output_json} to start over.")


#################################################################################
#                                   Evaluation                                  #
#################################################################################

def score_image(vae, mode, image, metrics, lpips_metric, fid, device):
    """One image's row of metrics (and its FID update): image is uint8 (3, S, S)."""
    x = image.to(device).float().div(255).unsqueeze(0)
    x_hat = reconstruct(vae, x, mode)
    row = {name: float(value) for name, value in pixel_metrics(x, x_hat, metrics).items()}
    if lpips_metric is not None:
        with torch.no_grad():
            row["lpips"] = float(lpips_distance(lpips_metric, x, x_hat))
    if fid is not None:
        fid.update(image.unsqueeze(0).to(fid.device), real=True)
        fid.update(x_hat.mul(255).round().to(torch.uint8).to(fid.device), real=False)
    return row


def summarize(rows, skipped, settings, fid, complete, bootstrap=(0, 0), features=None):
    """The JSON summary: the mean of each per-image metric, rFID, counts, every setting; with bootstrap = (N, seed)
    and N > 0, each metric's 95 % interval (rFID's from the Inception `features` of both sides)."""
    summary = {name: None for name in METRICS}
    for name in settings["metrics"]:
        if name != "rfid" and rows:
            summary[name] = float(np.mean([row[name] for row in rows]))
    if fid is not None and complete:
        summary["rfid"] = float(fid.compute()) if len(rows) >= 2 else None
    if complete:
        add_intervals(summary, *bootstrap, means={name: [row[name] for row in rows] for name in settings["metrics"]
                                                  if name != "rfid" and rows})
        if bootstrap[0] and summary["rfid"] is not None and features is not None:
            summary["rfid_ci95"] = json_interval(fid_ci(features["real"], features["generated"], *bootstrap,
                                                        aligned=True)[1])  # each image with its reconstruction
    summary.update(n_images=len(rows), n_skipped=len(skipped), complete=complete, **settings, skipped=skipped)
    return summary


def saved_features(path, n_rows):
    """{"real", "generated"}: the Inception features of the first n_rows rows saved with the FID sums."""
    saved = load_features(path)
    return {side: saved.get(side, np.zeros((0, 0)))[:n_rows] for side in ("real", "generated")}


def save_all_features(path, before, recorded):
    """The features saved before this run followed by the ones recorded in it."""
    save_features(path, **{side: np.concatenate([x for x in [before[side], *recorded[side]] if x.size])
                           if recorded[side] else before[side] for side in ("real", "generated")})


def main(args):
    """Check every flag, hold --output_json for this run, then evaluate (`run`)."""
    check_metrics(args.metrics)
    check_bootstrap(args.bootstrap)
    factor = VAE_MODES[args.vae_mode or "partitioned"].factor
    if args.size % factor or args.size <= 16:
        raise UsageError(f"--size {args.size}: --vae_mode {args.vae_mode or 'partitioned'} needs a multiple of "
                         f"{factor} above 16.")
    check_at_least(1, max_images=args.max_images, save_every=args.save_every, grid=args.grid)
    check_at_least(0, num_workers=args.num_workers)
    output_json = Path(args.output_json)
    if args.output_csv:
        outputs.make_writable_folder(Path(args.output_csv).parent, "--output_csv")
    with outputs.FolderLock(output_json.parent, "--output_json", name=f".{output_json.name}.lock"):
        return run(args)


def run(args):
    """Reconstruct and score each image not in the CSV yet, then write the summary; returns it."""
    metrics = check_metrics(args.metrics)
    device = torch.device(args.device)
    output_json = Path(args.output_json)
    csv_path = Path(args.output_csv or output_json.with_suffix(".csv"))
    fid_state = Path(f"{csv_path}.fid_state.pt")
    features_path = Path(f"{csv_path}.fid_features.npz")  # per-image Inception features, for rFID's interval

    # Load models (weight files first, so a missing one fails before any work):
    lpips_metric = (load_lpips(args.lpips_net, args.lpips_backbone, args.lpips_heads, device) if "lpips" in metrics
                    else None)
    fid = None
    if "rfid" in metrics:
        check_metric_files({"inception_weights": args.inception_weights})
        fid = load_fid(args.inception_weights, device, args.fid_feature)
    vae = load_vae(args.vae, args.vae_mode, args.grid, DTYPES[args.dtype]).to(device).eval()
    f16 = vae.config.get("f16_vae") if is_f16_vae(vae) else None
    mode, grid = (f16["mode"], f16["grid"]) if f16 else (args.vae_mode, None)
    settings = {"vae": str(Path(args.vae).resolve()), "vae_mode": mode, "grid": grid,
                "data_dir": str(Path(args.data_dir).resolve()), "size": args.size, "metrics": list(metrics),
                "lpips_net": args.lpips_net if "lpips" in metrics else None,
                "fid_feature": args.fid_feature if "rfid" in metrics else None, "dtype": args.dtype,
                "max_images": args.max_images,
                "stand_in_metrics": any(is_stand_in(path) for path in (args.inception_weights, args.lpips_backbone,
                                                                         args.lpips_heads))}

    # Resume from the CSV (FID: only the rows its saved sums cover):
    check_resume(output_json, settings, csv_path)
    names, skipped = list_eval_images(args.data_dir, args.max_images)
    rows = read_rows(csv_path)
    columns = ["file"] + [name for name in metrics if name != "rfid"]
    if fid is not None and rows:
        rows = rows[:load_fid_state(fid_state, fid)]
    if rows:  # rewritten without a row cut short, so that appended rows start on a line of their own
        write_rows(csv_path, rows, columns)
    done = {row["file"] for row in rows}
    save_json(output_json, summarize(rows, skipped, settings, None, complete=False))

    # Evaluate the remaining images, one at a time:
    todo = [name for name in names if name not in done]
    loader = torch.utils.data.DataLoader(ImageFiles(args.data_dir, todo, args.size), batch_size=None,
                                         num_workers=args.num_workers)
    before = saved_features(features_path, len(rows))  # the Inception features of the rows resumed from
    with recorded_features(fid) if fid is not None else nullcontext({"real": [], "generated": []}) as recorded:
        for i, (name, image, reason) in enumerate(tqdm(loader, desc=f"eval_vae {mode}", unit="image",
                                                       total=len(names), initial=len(rows), disable=args.no_progress)):
            if image is None:
                skipped.append({"file": name, "reason": reason})
                continue
            row = {"file": name, **score_image(vae, mode, image, metrics, lpips_metric, fid, device)}
            rows.append(row)
            write_rows(csv_path, [row], columns, mode="a")
            if (i + 1) % args.save_every == 0:
                if fid is not None:
                    save_fid_state(fid_state, fid, len(rows))
                    save_all_features(features_path, before, recorded)
                save_json(output_json, summarize(rows, skipped, settings, None, complete=False))
        if fid is not None:
            save_fid_state(fid_state, fid, len(rows))
            save_all_features(features_path, before, recorded)
            if len(rows) < 2:
                raise UsageError(f"rFID needs at least 2 images; {len(rows)} could be read from {args.data_dir}.")
    features = saved_features(features_path, len(rows))
    complete_features = fid is not None and all(len(features[side]) == len(rows) for side in features)
    summary = summarize(rows, skipped, settings, fid, complete=True, bootstrap=(args.bootstrap, args.bootstrap_seed),
                        features=features if complete_features else None)
    save_json(output_json, summary)
    print(json.dumps({k: v for k, v in summary.items() if k != "skipped"}))
    return summary


def check_metrics(text):
    """The --metrics names in the canonical order; UsageError for an unknown one."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in METRICS]
    if unknown or not names:
        raise UsageError(f"--metrics {text!r}: choose from {','.join(METRICS)} (comma-separated).")
    return tuple(name for name in METRICS if name in names)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--vae", required=True, help="a diffusers VAE folder, or a pipeline folder with vae/")
    parser.add_argument("--data_dir", required=True, help="imagefolder (metadata.jsonl) or a folder of images")
    parser.add_argument("--size", type=int, default=4096)  # paper Table 2: Aesthetic-4K train at 4096^2
    parser.add_argument("--vae_mode", choices=EVAL_MODES, default=None,
                        help="f8: the stock VAE; f8_half: it on the image shrunk by 2, enlarged back; full / "
                             "partitioned / subpixel: F=16, exact; authors: F=16 with the authors' one-pixel crop "
                             "(their SC-VAE checkpoint). Default: the F=16 mode the VAE folder recorded, else "
                             "partitioned")
    parser.add_argument("--grid", type=int, default=None, help="partitions per side (partitioned, authors; default 2)")
    parser.add_argument("--output_json", required=True, help="the summary; the per-image CSV goes beside it")
    parser.add_argument("--output_csv", default=None, help="per-image rows (default: --output_json with .csv)")
    parser.add_argument("--metrics", default=",".join(METRICS),
                        help="comma-separated subset; nmse,nrmse,psnr,ssim need no weight files")
    add_lpips_flags(parser, "alex")  # the usual choice for reporting
    parser.add_argument("--inception_weights", default=None, help=WEIGHT_SOURCES["inception_weights"])
    parser.add_argument("--fid_feature", type=int, choices=(64, 192, 768, 2048), default=2048,
                        help="Inception layer: 2048 (pool) is the standard FID; the smaller ones are quick checks")
    parser.add_argument("--max_images", type=int, default=None, help="only the first N files")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="the VAE's dtype (metrics in fp32+)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num_workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="processes decoding the next images (at most 2, at most the cores)")
    parser.add_argument("--save_every", type=int, default=25, help="images between saves of the FID sums and JSON")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    add_bootstrap_flags(parser)
    return parser.parse_args(argv)


if __name__ == "__main__":
    exit_on_usage_error("eval_vae.py", main, parse_args())
