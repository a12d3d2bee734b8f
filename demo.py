"""Diffusion-4K in miniature: every script of the repo, end to end, on tiny random-weight checkpoints (CPU)."""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent
# Photographs that ship with scikit-image, with captions written for them.
PHOTOS = {
    "astronaut": "a portrait of an astronaut in a white space suit in front of an american flag",
    "coffee": "a close up photo of a cup of coffee on a saucer, top view",
    "chelsea": "a photo of an orange tabby cat looking to the side",
    "rocket": "a rocket standing on the launch pad under a blue sky",
    "hubble_deep_field": "a deep space photograph full of small bright galaxies",
    "retina": "a detailed medical photograph of a human retina with red blood vessels",
    "immunohistochemistry": "a microscope image of stained tissue with brown and blue cells",
    "coins": "a gray photograph of old coins on a dark background",
}
EVAL_PROMPTS = ["a cat on a red sofa", "a rocket in space", "a cup of coffee", "a mountain lake at sunset"]


def log(msg):
    """Print a timestamped demo message."""
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(name, cmd, out, env=None):
    """Run one repo script as a user would; its output goes to OUT/logs/NAME.log; fail loudly with its tail."""
    (out / "logs").mkdir(parents=True, exist_ok=True)
    log_file = out / "logs" / f"{name}.log"
    log(f"{name}: {' '.join(str(c) for c in cmd)}")
    with open(log_file, "w") as f:
        result = subprocess.run([str(c) for c in cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})
    if result.returncode != 0:
        tail = log_file.read_text().splitlines()[-30:]
        sys.exit(f"demo step '{name}' failed (exit {result.returncode}); last lines of {log_file}:\n" + "\n".join(tail))


def make_image_folder(folder, photos, min_side):
    """Write PHOTOS as an HF imagefolder (PNG files + metadata.jsonl), each up-scaled so its shorter side >= min_side."""
    import skimage.data

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metadata.jsonl", "w") as f:
        for name, caption in photos.items():
            image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
            scale = max(1.0, min_side / min(image.size))
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
            image.save(folder / f"{name}.png")
            f.write(json.dumps({"file_name": f"{name}.png", "text": caption}) + "\n")


def contact_sheet(rows, path, thumb=160):
    """Save a grid image: one labelled row per (label, [image paths])."""
    width = max(len(paths) for _, paths in rows) * (thumb + 8) + 8
    sheet = Image.new("RGB", (width, len(rows) * (thumb + 28) + 8), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (label, paths) in enumerate(rows):
        y = 8 + r * (thumb + 28)
        draw.text((8, y), label, fill="black")
        for c, p in enumerate(paths):
            image = Image.open(p).convert("RGB")
            image.thumbnail((thumb, thumb))
            sheet.paste(image, (8 + c * (thumb + 8), y + 18))
    sheet.save(path)


def main(args):
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    os.environ["HF_HUB_OFFLINE"] = "1"
    summary = {"settings": vars(args)}

    # Setup: tiny checkpoints and metric stand-ins (random weights, built offline):
    ckpt = out / "ckpt"
    if not (ckpt / "tiny-metrics").exists():
        run("tiny_models", [py, "tiny_models.py", "--out", ckpt, "--metrics"], out)

    # Setup data: a training set and an eval set in the Hugging Face imagefolder layout:
    train_dir, eval_dir = out / "data" / "train", out / "data" / "eval"
    if not (train_dir / "metadata.jsonl").exists():
        make_image_folder(train_dir, PHOTOS, args.resolution)
    if not (eval_dir / "metadata.jsonl").exists():
        make_image_folder(eval_dir, dict(zip(list(PHOTOS)[:4], EVAL_PROMPTS)), args.eval_size)

    # Fine-tune: WLF through accelerate launch + DeepSpeed ZeRO-2 (optimizer offloaded to CPU):
    for model in ("sd3", "flux"):
        finetuned = out / f"finetuned-{model}"
        if not (finetuned / "model_index.json").exists():
            run(f"train_{model}", [
                py, "-m", "accelerate.commands.launch", "--config_file", "ds_config.yaml", "--num_processes", "1",
                "--mixed_precision", "no", f"train_{model}.py",
                "--pretrained_model_name_or_path", ckpt / f"tiny-{model}", "--instance_data_dir", train_dir,
                "--output_dir", finetuned, "--resolution", args.resolution, "--train_batch_size", 1,
                "--max_train_steps", args.train_steps, "--checkpointing_steps", args.train_steps,
                "--mixed_precision", "no", "--loss", "wlf", "--seed", 0, "--random_flip",
            ], out)
        summary[f"train_{model}"] = json.loads((finetuned / "train_summary.json").read_text())

    # Generate: the CLIs through the F=16 partitioned VAE at a non-square size (2 seeds each):
    gen_dir = out / "generated"
    for model in ("sd3", "flux"):
        if len(list((gen_dir / model).glob("*.png"))) < 2:
            run(f"generate_{model}", [
                py, f"test_{model}.py", "--checkpoint_path", out / f"finetuned-{model}", "--prompt", args.prompt,
                "--height", args.height, "--width", args.width, "--num_inference_steps", args.steps,
                "--num_images", 2, "--seed", 0, "--dtype", "fp32", "--device", "cpu", "--vae_mode", "partitioned",
                "--save_path", gen_dir / model, "--overwrite",
            ], out)

    # Evaluate: GLCM Score and Compression Ratio of the generated images, then the eval-set protocol:
    for model in ("sd3", "flux"):
        run(f"eval_{model}", [py, "eval.py", "--img_root", gen_dir / model, "--workers", 1,
                              "--output_json", out / f"detail_{model}.json", "--output_csv", out / f"detail_{model}.csv"], out)
        summary[f"detail_{model}"] = json.loads((out / f"detail_{model}.json").read_text())
    from tiny_models import TINY_METRIC_FILES

    stand_ins = [a for flag, name in TINY_METRIC_FILES.items() for a in (f"--{flag}", ckpt / "tiny-metrics" / name)]
    run("generate_and_eval_fid", [
        py, "generate_and_eval_fid.py", "--checkpoint_path", out / "finetuned-sd3", "--model", "sd3",
        "--json_file", eval_dir / "metadata.jsonl", "--size", args.eval_size, "--save_path", out / "eval_sd3",
        "--num_inference_steps", args.steps, "--dtype", "fp32", "--fid_feature", 64, "--num_workers", 0, *stand_ins,
    ], out)
    summary["fid_sd3"] = json.loads((out / "eval_sd3" / "metrics.json").read_text())

    # Summary: table and contact sheet:
    generated = {m: sorted((gen_dir / m).glob("*.png")) for m in ("sd3", "flux")}
    contact_sheet([("training images (scikit-image photographs)", sorted(train_dir.glob("*.png"))),
                   ("tiny SD3, fine-tuned with WLF, F=16 partitioned VAE", generated["sd3"]),
                   ("tiny Flux, fine-tuned with WLF, F=16 partitioned VAE", generated["flux"])], out / "summary.png")
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print_table(summary, generated, out)


def print_table(summary, generated, out):
    """Print the files, losses and metrics that the demo produced."""
    rows = []
    for model in ("sd3", "flux"):
        train = summary[f"train_{model}"]
        detail = summary[f"detail_{model}"]
        rows.append((model, len(generated[model]), train.get("final_loss"), detail["glcm_score"], detail["compression_ratio"]))
    print("\nmodel  images  final WLF loss  GLCM score  compression ratio")
    for model, n, loss, glcm, cr in rows:
        print(f"{model:<6} {n:>6}  {loss if loss is None else f'{loss:.4f}':>14}  {glcm:>10.4f}  {cr:>17.2f}")
    fid = summary["fid_sd3"]
    print(f"\neval set (tiny SD3): FID {fid['fid']:.2f}  CLIPScore {fid['clip_score']:.2f}  Aesthetics {fid['aesthetics']:.3f}")
    print(f"\noutputs in {out}: summary.png, summary.json, generated/, finetuned-*/, eval_sd3/, logs/")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="demo_out")
    parser.add_argument("--resolution", type=int, default=256, help="training resolution (the paper: 4096)")
    parser.add_argument("--train_steps", type=int, default=6)
    parser.add_argument("--height", type=int, default=384)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--steps", type=int, default=8, help="denoising steps (the paper: 28 for SD3, 50 for Flux)")
    parser.add_argument("--eval_size", type=int, default=256, help="eval-set image size (the paper: 2048)")
    parser.add_argument("--prompt", default="a photo of a cat on the beach at sunset, highly detailed")
    main(parser.parse_args())
