"""Diffusion-4K in miniature, on real pictures (CPU): a tiny SD3 and a tiny Flux pretrained on the eight scikit-image
photographs (miniature.py), then the paper's steps through the scripts a user runs: the F=16 VAE without retraining, WLF
fine-tuning at F=16 under DeepSpeed ZeRO-2, generation, GLCM Score / Compression Ratio and the eval protocol.

    python demo.py [--out demo_out]                    # the demo (bash demo.sh installs the venv first)
    python demo.py photos data/tiny [--size 256]       # only the photos, as a training imagefolder (docs/quickstart.md)
"""
import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from errors import HelpFormatter, UsageError, check_at_least, exit_on_usage_error

ROOT = Path(__file__).resolve().parent
# The fine-tuning runs (name: trainer flags), all from the same seed; the first one's samples are "after fine-tuning".
FINETUNES = {  # name: (model, trainer flags); Flux gets one WLF fine-tune beside SD3's three
    "wlf": ("sd3", ["--loss", "wlf"]),
    "mse": ("sd3", ["--loss", "mse"]),
    "wlf-1222": ("sd3", ["--loss", "wlf", "--wavelet_band_weights", "1,2,2,2"]),
    "flux-wlf": ("flux", ["--loss", "wlf"]),
}
# Sample folders: name -> (model, the pipeline folder in OUT); mse is not generated: its weights are wlf's (summary).
GENERATED = {"pretrained": ("sd3", "miniature-sd3"), "wlf": ("sd3", "finetuned-wlf"),
             "wlf-1222": ("sd3", "finetuned-wlf-1222"), "flux-pretrained": ("flux", "miniature-flux"),
             "flux-wlf": ("flux", "finetuned-flux-wlf")}
LABELS = {"pretrained": "SD3 before fine-tuning", "wlf": "SD3 after WLF", "mse": "SD3 after MSE",
          "wlf-1222": "SD3 after WLF 1,2,2,2", "flux-pretrained": "Flux before fine-tuning", "flux-wlf": "Flux after WLF"}
# A sample matches its photo when its PSNR to that photo beats, by this margin, both its PSNR to every other photo and
# the PSNR of the photo's own mean colour as a flat image (no flat image, a black square included, can beat that).
MATCH_MARGIN_DB = 1.0
MATCH_RULE = (f"PSNR to its own photo at least {MATCH_MARGIN_DB:g} dB above its PSNR to every other photo and above "
              f"the PSNR of the photo's mean colour as a flat image")
FIRST_RUN = "about 6 min on 2 CPU cores, 1 of them compiling DeepSpeed's cpu_adam once"  # BENCHMARKS.md, "The demo"


def log(msg):
    """Print a timestamped demo message."""
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(name, what, cmd, out, show=False):
    """Run one repo script as a user would, saying `what` it does first; its output goes to OUT/logs/NAME.log (and
    the screen if `show`); fail loudly."""
    (out / "logs").mkdir(parents=True, exist_ok=True)
    log_file = out / "logs" / f"{name}.log"
    log(f"{what} (log: {log_file})")
    start = time.time()
    with open(log_file, "w") as f:
        f.write(" ".join(str(c) for c in cmd) + "\n")
        process = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True)
        for line in process.stdout:
            f.write(line)
            if show and line.startswith("["):
                print("  " + line, end="", flush=True)
    if process.wait() != 0:
        tail = log_file.read_text().splitlines()[-30:]
        sys.exit(f"demo step '{name}' failed (exit {process.returncode}); last lines of {log_file}:\n"
                 + "\n".join(tail))
    log(f"{name}: done in {time.time() - start:.0f} s")


def check_settings(out, settings):
    """Record the settings in OUT/demo_settings.json, or refuse an OUT made with other ones: every step after the
    miniature is kept by the files it wrote, so mixing two settings in one folder would mix their results."""
    record = out / "demo_settings.json"
    if record.is_file():
        before = json.loads(record.read_text())
        changed = [f"--{key} {before.get(key)} -> {value}" for key, value in settings.items()
                   if before.get(key) != value]
        if changed:
            raise UsageError(f"{out} holds a demo run with other settings ({', '.join(changed)}): pass a new --out, "
                             f"or delete {out} to start again.")
    else:
        record.write_text(json.dumps(settings, indent=2) + "\n")


def make_image_folder(folder, size):
    """Write the photos (size x size) as an HF imagefolder (PNG files + metadata.jsonl), and captions.txt (one
    caption a line) beside the folder."""
    from miniature import PHOTOS, photo

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metadata.jsonl", "w") as f:
        for name, caption in PHOTOS.items():
            photo(name, size).save(folder / f"{name}.png")
            f.write(json.dumps({"file_name": f"{name}.png", "text": caption}) + "\n")
    (folder.parent / "captions.txt").write_text("\n".join(PHOTOS.values()) + "\n")


def finetune(name, model, flags, out, photos_dir, args):
    """OUT/finetuned-NAME: the `model` miniature fine-tuned on the photos by train_MODEL.py under accelerate launch
    with DeepSpeed ZeRO-2 (kept when already there)."""
    from miniature import PHOTOS

    finetuned = out / f"finetuned-{name}"
    if (finetuned / "model_index.json").exists():
        return
    run(f"train_{name}", f"fine-tuning: {LABELS[name]} ({' '.join(flags)}), {args.finetune_steps} steps under "
        f"DeepSpeed ZeRO-2 (accelerate launch train_{model}.py)", [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", "ds_config.yaml", "--num_processes", "1",
        "--mixed_precision", "no", f"train_{model}.py",
        "--pretrained_model_name_or_path", out / f"miniature-{model}", "--instance_data_dir", photos_dir,
        "--output_dir", finetuned, "--resolution", args.resolution, "--train_batch_size", len(PHOTOS),
        "--cache_latents", "--no-random_flip", "--max_train_steps", args.finetune_steps,
        "--checkpointing_steps", args.finetune_steps, "--learning_rate", args.learning_rate,
        "--mixed_precision", "no", "--seed", args.seed, "--report_to", "none", *flags,
        "--resume_from_checkpoint", "latest",  # a demo killed while training continues its run
    ], out)


def generate(name, model, pipeline, captions, folder, out, args):
    """One image per caption from `pipeline` by test_MODEL.py through the F=16 partitioned VAE. Flux: its miniature's
    training guidance and T5 length (it has no classifier-free guidance)."""
    from miniature import FLUX_GUIDANCE, FLUX_TEXT_LENGTH

    model_flags = (["--guidance_scale", FLUX_GUIDANCE, "--max_sequence_length", FLUX_TEXT_LENGTH] if model == "flux"
                   else ["--guidance_scale", args.guidance_scale])
    run(f"generate_{name}", f"generating one image per photo caption: {LABELS[name]} (test_{model}.py, F=16 "
        f"partitioned VAE, {args.steps} steps)", [
        sys.executable, f"test_{model}.py", "--checkpoint_path", pipeline, "--prompt_file", captions,
        "--height", args.resolution, "--width", args.resolution, "--num_inference_steps", args.steps, *model_flags,
        "--num_images", 1, "--seed", args.seed, "--dtype", "fp32", "--device", "cpu", "--vae_mode", "partitioned",
        "--save_path", folder, "--overwrite",
    ], out)


#################################################################################
#                         Measurements on the pictures                          #
#################################################################################

def mean_rgb(image):
    """The mean colour of an RGB image, per channel, to 0.1."""
    return [round(float(v), 1) for v in np.asarray(image, dtype=np.float64).mean(axis=(0, 1))]


def vae_reconstructions(pipeline_dir, photos_dir, out_dir):
    """F=8, F=16 (make_f16_vae, no retraining) and f8_half (F=8 of the photo shrunk by 2, enlarged back)
    reconstructions of each photo, saved as PNGs; returns {name: {kind: (path, PSNR dB, mean RGB)}}."""
    import torch
    from diffusers import AutoencoderKL

    from miniature import PHOTOS, psnr, reconstruct, to_images, to_tensor
    from partitioned_vae import load_f16_vae

    out_dir.mkdir(parents=True, exist_ok=True)
    photos = [Image.open(photos_dir / f"{name}.png").convert("RGB") for name in PHOTOS]
    size = photos[0].size
    halves = [p.resize((size[0] // 2, size[1] // 2), Image.Resampling.BOX) for p in photos]
    vae8 = AutoencoderKL.from_pretrained(pipeline_dir, subfolder="vae").eval()
    vae16 = load_f16_vae(pipeline_dir, subfolder="vae").eval()
    with torch.no_grad():
        recons = {"f8": to_images(reconstruct(vae8, to_tensor(photos))),
                  "f16": to_images(reconstruct(vae16, to_tensor(photos))),
                  "f8_half": [r.resize(size, Image.Resampling.BICUBIC)
                              for r in to_images(reconstruct(vae8, to_tensor(halves)))]}
    result = {}
    for i, name in enumerate(PHOTOS):
        result[name] = {}
        for kind, images in recons.items():
            path = out_dir / f"{name}_{kind}.png"
            images[i].save(path)
            result[name][kind] = (path, psnr(images[i], photos[i]), mean_rgb(images[i]))
    return result


def samples_by_photo(folder):
    """{photo name: image path} of the images test_sd3.py wrote to `folder` (their JSON sidecar names the prompt)."""
    from miniature import PHOTOS

    by_caption = {caption: name for name, caption in PHOTOS.items()}
    found = {}
    for sidecar in folder.glob("*.json"):
        meta = json.loads(sidecar.read_text())
        if meta.get("prompt") in by_caption:
            found[by_caption[meta["prompt"]]] = folder / meta["image"]
    return found


def mean_colour_image(image):
    """The image's mean colour as a flat image of its size: the flat image nearest to it in PSNR (to rounding)."""
    array = np.asarray(image, dtype=np.float64)
    return Image.fromarray(np.broadcast_to(array.mean(axis=(0, 1)).round(), array.shape).astype(np.uint8))


def sample_scores(samples, photos_dir):
    """Per photo: its sample's PSNR against it and against the nearest other photo, the PSNR of the photo's own
    mean-colour image (the best any flat image scores), the margin (how far the first beats the larger of the other
    two, dB) and whether it matches (MATCH_RULE)."""
    from miniature import PHOTOS, psnr

    photos = {name: Image.open(photos_dir / f"{name}.png").convert("RGB") for name in PHOTOS}
    scores = {}
    for name, path in samples.items():
        image = Image.open(path).convert("RGB")
        against = {other: psnr(image, photo) for other, photo in photos.items()}
        others = {other: value for other, value in against.items() if other != name}
        nearest_other = max(others, key=others.get)
        flat = psnr(mean_colour_image(photos[name]), photos[name])
        margin = against[name] - max(others[nearest_other], flat)
        scores[name] = {"psnr": against[name], "nearest_other": nearest_other, "psnr_nearest_other": others[nearest_other],
                        "psnr_mean_colour": flat, "margin_db": margin, "match": margin >= MATCH_MARGIN_DB}
    return scores


def weight_difference(dir_a, dir_b):
    """Largest absolute difference between two saved transformers' weights, and the largest weight."""
    from safetensors.torch import load_file

    a = load_file(dir_a / "transformer" / "diffusion_pytorch_model.safetensors")
    b = load_file(dir_b / "transformer" / "diffusion_pytorch_model.safetensors")
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    return {"max_abs_difference": diff, "max_abs_weight": max(v.float().abs().max().item() for v in a.values())}


def detail_means(csv_path):
    """Mean GLCM Score and Compression Ratio per generated sub-folder, from eval.py's per-image CSV."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    means = {}
    for folder in GENERATED:
        mine = [r for r in rows if Path(r["file"]).parent.name == folder]
        if mine:
            means[folder] = {"glcm_score": sum(float(r["glcm"]) for r in mine) / len(mine),
                             "compression_ratio": sum(float(r["compression_ratio"]) for r in mine) / len(mine)}
    return means


#################################################################################
#                                   Summary                                     #
#################################################################################

SHEET_COLUMNS = [("photo", ""), ("F=8", "reconstruction"), ("F=16", "reconstruction"), ("F=8 of the photo",
                 "at half size, up"), *((LABELS[g].split(" ", 1)[0], LABELS[g].split(" ", 1)[1]) for g in GENERATED)]
THUMB, LINE = 128, 12  # summary.png: thumbnail side, text line height


def contact_sheet(rows, columns, notes, path, thumb=THUMB):
    """A grid image: two lines of title per column, one row per photo (its full name, then (image path, caption)
    cells), and lines of notes under it."""
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    cell_w, cell_h = thumb + 8, thumb + 6 + LINE
    left = int(max(probe.textlength(label) for label, _ in rows)) + 12
    top = 2 * LINE + 6
    sheet = Image.new("RGB", (left + len(columns) * cell_w, top + len(rows) * cell_h + len(notes) * LINE + 8), "white")
    draw = ImageDraw.Draw(sheet)
    for c, lines in enumerate(columns):
        for k, line in enumerate(lines):
            draw.text((left + c * cell_w, 2 + k * LINE), line, fill="black")
    for r, (label, cells) in enumerate(rows):
        y = top + r * cell_h
        draw.text((4, y + thumb // 2), label, fill="black")
        for c, (image_path, caption) in enumerate(cells):
            image = Image.open(image_path).convert("RGB").resize((thumb, thumb), Image.Resampling.BICUBIC)
            sheet.paste(image, (left + c * cell_w, y))
            draw.text((left + c * cell_w, y + thumb + 3), caption, fill="black")
    for k, note in enumerate(notes):
        draw.text((4, top + len(rows) * cell_h + 4 + k * LINE), note, fill="black")
    sheet.save(path)


def summary_sheet(summary, recon, samples, photos_dir, path):
    """summary.png: per photo the original, its three reconstructions (PSNR) and its samples (PSNR, match, margin)."""
    from miniature import PHOTOS

    rows = []
    for name in PHOTOS:
        cells = [(photos_dir / f"{name}.png", "original")]
        cells += [(recon[name][kind][0], f"{recon[name][kind][1]:.1f} dB") for kind in ("f8", "f16", "f8_half")]
        for g in GENERATED:
            score = summary["samples"][g]["per_photo"][name]
            cells.append((samples[g][name], f"{score['psnr']:.1f} dB, {'match' if score['match'] else 'no match'} "
                                            f"{score['margin_db']:+.1f}"))
        rows.append((name, cells))
    notes = [f"Under each sample: its PSNR to its own photo; match: {MATCH_RULE};",
             "the signed number is that margin in dB (the own-photo PSNR minus the larger of the other two)."]
    contact_sheet(rows, SHEET_COLUMNS, notes, path)


def print_table(summary):
    """Print the numbers the demo produced."""
    s = summary
    print(f"\nVAE reconstruction PSNR (mean over the 8 photos): F=8 {s['vae_psnr_f8']:.2f} dB, F=16 (no retraining) "
          f"{s['vae_psnr_f16']:.2f} dB, F=8 of the photo shrunk 2x and enlarged back {s['vae_psnr_f8_half']:.2f} dB")
    coins = s["vae_mean_rgb"]["coins"]
    print(f"VAE colour: the grey coins photo (mean RGB {'/'.join(f'{v:.0f}' for v in coins['photo'])}) comes back "
          f"{'/'.join(f'{v:.0f}' for v in coins['f8'])} at F=8, {'/'.join(f'{v:.0f}' for v in coins['f16'])} at F=16")
    print(f"A sample matches its photo when its {MATCH_RULE}.")
    for name in GENERATED:
        g = s["samples"][name]
        d = s["detail"].get(name, {})
        print(f"{LABELS[name]:<23}: PSNR to own photo {g['psnr']:.2f} dB, matches {g['match']}/8 (smallest margin "
              f"{g['min_margin_db']:+.1f} dB), GLCM Score {d.get('glcm_score', float('nan')):.4f}, Compression Ratio "
              f"{d.get('compression_ratio', float('nan')):.2f}")
    f = s["findings"]
    print(f"WLF (equal band weights) vs MSE: largest weight difference {f['wlf_vs_mse']['max_abs_difference']:.2e}; "
          f"WLF 1,2,2,2 vs WLF: {f['wlf_1222_vs_wlf']['max_abs_difference']:.2e}")
    change = f["wlf_1222_detail_change"]
    print(f"1,2,2,2 instead of equal band weights changed the samples' GLCM Score by {change['glcm_score']:+.4f} and "
          f"their Compression Ratio by {change['compression_ratio']:+.3f}")
    fid = s["fid_sd3"]
    print(f"eval protocol (random stand-in metric networks, numbers meaningless): FID {fid['fid']:.2f}  "
          f"CLIPScore {fid['clip_score']:.2f}  Aesthetics {fid['aesthetics']:.3f}")
    print(f"\nsample_match {s['sample_match']}/8 (SD3), {s['sample_match_flux']}/8 (Flux); outputs in {s['out']}: "
          f"summary.png, summary.json, logs/ ({s['seconds']:.0f} s)")


def main(args):
    if args.command == "photos":
        return write_photos(Path(args.folder), args.size)
    out = Path(args.out).resolve()  # relative to where the demo was started
    out.mkdir(parents=True, exist_ok=True)
    check_settings(out, {key: value for key, value in vars(args).items() if key not in ("out", "command")})
    py = sys.executable
    os.environ["HF_HUB_OFFLINE"] = "1"
    start = time.time()
    summary = {"settings": vars(args), "out": str(out)}
    from accelerated import deepspeed_builds_pending
    from miniature import PHOTOS, build_settings, flux_settings, is_built

    log(f"output folder {out}; a first run takes {FIRST_RUN}; a second run reuses everything")
    # The pretrained model in miniature (cached: built once per settings):
    mini = out / "miniature-sd3"
    settings = build_settings(args.resolution, args.vae_steps, args.transformer_steps, args.seed)
    if not is_built(mini, settings):
        run("miniature", f"pretraining the SD3 miniature on the photos: a VAE ({args.vae_steps} steps), then a "
            f"transformer ({args.transformer_steps} steps); the longest step, built once", [
                py, "miniature.py", "--output_dir", mini, "--size", args.resolution, "--vae_steps", args.vae_steps,
                "--transformer_steps", args.transformer_steps, "--seed", args.seed], out, show=True)
    summary["miniature"] = json.loads((mini / "MINIATURE.json").read_text())
    mini_flux = out / "miniature-flux"  # a Flux transformer on the same VAE's latents
    if not is_built(mini_flux, flux_settings(mini, args.transformer_steps, args.seed)):
        run("miniature_flux", f"pretraining the Flux miniature: a transformer ({args.transformer_steps} steps) on the "
            f"same VAE, built once", [
                py, "miniature.py", "--model", "flux", "--vae_from", mini, "--output_dir", mini_flux,
                "--transformer_steps", args.transformer_steps, "--seed", args.seed], out, show=True)
    summary["miniature_flux"] = json.loads((mini_flux / "MINIATURE.json").read_text())

    # Data: the photos as a training imagefolder (also the eval set, real images for FID), captions as prompts:
    photos_dir = out / "data" / "photos"
    if not (photos_dir / "metadata.jsonl").exists():
        make_image_folder(photos_dir, args.resolution)

    # The F=16 VAE without retraining, against F=8 and against F=8 at half the resolution:
    log("reconstructing the photos with the F=8 VAE, the same weights at F=16, and F=8 at half size")
    recon = vae_reconstructions(mini, photos_dir, out / "reconstructions")
    for kind in ("f8", "f16", "f8_half"):
        summary[f"vae_psnr_{kind}"] = sum(r[kind][1] for r in recon.values()) / len(recon)
    summary["vae_psnr_per_photo"] = {n: {k: v[1] for k, v in r.items()} for n, r in recon.items()}
    summary["vae_mean_rgb"] = {n: {"photo": mean_rgb(Image.open(photos_dir / f"{n}.png").convert("RGB")),
                                   **{k: v[2] for k, v in r.items()}} for n, r in recon.items()}

    # WLF fine-tuning at F=16 through accelerate launch + DeepSpeed ZeRO-2 (optimizer offloaded to CPU):
    to_train = [name for name in FINETUNES if not (out / f"finetuned-{name}" / "model_index.json").exists()]
    if to_train and "cpu_adam" in deepspeed_builds_pending(offload_optimizer=True):
        log("compiling DeepSpeed's cpu_adam (first run only, ~1–2 min), inside the first fine-tuning run")
    for name, (model, flags) in FINETUNES.items():
        finetune(name, model, flags, out, photos_dir, args)
        summary[f"train_{name}"] = json.loads((out / f"finetuned-{name}" / "train_summary.json").read_text())
    summary["findings"] = {"wlf_vs_mse": weight_difference(out / "finetuned-wlf", out / "finetuned-mse"),
                           "wlf_1222_vs_wlf": weight_difference(out / "finetuned-wlf", out / "finetuned-wlf-1222")}

    # Generate through the F=16 partitioned VAE, before and after fine-tuning, one image per caption:
    gen_dir = out / "generated"
    for name, (model, pipeline) in GENERATED.items():
        if len(samples_by_photo(gen_dir / name)) < len(PHOTOS):
            generate(name, model, out / pipeline, out / "data" / "captions.txt", gen_dir / name, out, args)
    samples = {name: samples_by_photo(gen_dir / name) for name in GENERATED}
    summary["match_rule"], summary["match_margin_db"], summary["samples"] = MATCH_RULE, MATCH_MARGIN_DB, {}
    for name in GENERATED:
        scores = sample_scores(samples[name], photos_dir)
        summary["samples"][name] = {"label": LABELS[name],
                                    "psnr": sum(s["psnr"] for s in scores.values()) / len(scores),
                                    "match": sum(s["match"] for s in scores.values()),
                                    "min_margin_db": min(s["margin_db"] for s in scores.values()),
                                    "per_photo": scores}
    summary["sample_match"] = summary["samples"]["wlf"]["match"]
    summary["sample_match_flux"] = summary["samples"]["flux-wlf"]["match"]

    # Evaluate: GLCM Score and Compression Ratio of every sample, then the eval protocol on the fine-tuned model:
    detail_csv = out / "detail.csv"
    if not detail_csv.exists():
        run("eval", "measuring GLCM Score and Compression Ratio of every sample (eval.py)", [
            py, "eval.py", "--img_root", gen_dir, "--recursive", "--workers", 1, "--output_json", out / "detail.json",
            "--output_csv", detail_csv], out)
    summary["detail"] = detail_means(detail_csv)
    summary["findings"]["wlf_1222_detail_change"] = {  # what 1,2,2,2 did to the samples, against equal weights
        key: summary["detail"]["wlf-1222"][key] - summary["detail"]["wlf"][key]
        for key in ("glcm_score", "compression_ratio")}
    fid_dir = out / "eval_sd3"
    if not (fid_dir / "metrics.json").exists():
        from tiny_models import MARKER, TINY_METRIC_FILES, save_tiny_metric_models

        metrics_dir = out / "tiny-metrics"
        if not (metrics_dir / MARKER).exists():
            save_tiny_metric_models(metrics_dir, args.seed)
        stand_ins = [a for flag, name in TINY_METRIC_FILES.items() for a in (f"--{flag}", metrics_dir / name)]
        run("generate_and_eval_fid", "the eval protocol on the photos: generating with SD3 after WLF, then FID, "
            "CLIPScore, Aesthetics with random stand-in networks (generate_and_eval_fid.py)", [
                py, "generate_and_eval_fid.py", "--checkpoint_path", out / "finetuned-wlf", "--model", "sd3",
                "--json_file", photos_dir / "metadata.jsonl", "--size", args.resolution, "--save_path", fid_dir,
                "--num_inference_steps", args.steps, "--guidance_scale", args.guidance_scale, "--dtype", "fp32",
                "--fid_feature", 64, "--num_workers", 0, *stand_ins], out)
    summary["fid_sd3"] = json.loads((fid_dir / "metrics.json").read_text())
    summary["fid_sd3_note"] = "FID, CLIPScore and Aesthetics computed with random-weight stand-in networks: meaningless"

    # Summary: one row per photo, every number in summary.json:
    summary_sheet(summary, recon, samples, photos_dir, out / "summary.png")
    summary["seconds"] = round(time.time() - start, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print_table(summary)


def write_photos(folder, size):
    """The `photos` sub-command: the eight photos at size x size as a training imagefolder, captions.txt beside it."""
    check_at_least(16, size=size)
    make_image_folder(folder, size)
    print(f"{folder}: 8 photos ({size}x{size}) and metadata.jsonl; their captions, one a line: "
          f"{folder.parent / 'captions.txt'}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--out", default="demo_out", help="output folder, relative to where you run the demo")
    parser.add_argument("--resolution", type=int, default=128, help="photo and training size (the paper: 4096)")
    parser.add_argument("--vae_steps", type=int, default=570, help="miniature VAE pretraining steps")
    parser.add_argument("--transformer_steps", type=int, default=800, help="miniature transformer pretraining steps")
    parser.add_argument("--finetune_steps", type=int, default=20, help="WLF fine-tuning steps (the paper: 20,000)")
    parser.add_argument("--learning_rate", type=float, default=1e-4, help="fine-tuning learning rate (the paper: 1e-6)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (the paper: 28 for SD3)")
    parser.add_argument("--guidance_scale", type=float, default=1.0,
                        help="1: no classifier-free guidance (the miniature never saw an empty caption; paper: 7)")
    parser.add_argument("--seed", type=int, default=0)
    commands = parser.add_subparsers(dest="command", title="sub-command (none: run the demo)", metavar="photos")
    photos = commands.add_parser("photos", formatter_class=HelpFormatter,
                                 help="only write the eight photos as a training imagefolder, and stop")
    photos.add_argument("folder", help="the imagefolder to write (e.g. data/tiny); captions.txt goes beside it")
    photos.add_argument("--size", type=int, default=256, help="side of the square photos, pixels")
    return parser.parse_args(argv)


if __name__ == "__main__":
    exit_on_usage_error("demo.py", main, parse_args())
