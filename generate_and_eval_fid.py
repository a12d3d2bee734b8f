"""Generate the Aesthetic-Eval set (one image per prompt) and score it: FID, CLIPScore, Aesthetics, GLCM, CR.

Sharded and resumable: `accelerate launch generate_and_eval_fid.py ...` splits the missing images between the
processes; images already in --save_path are kept, so a killed run continues where it stopped. The metrics are
computed once, on the main process, over every image. All models load from local files (nothing is downloaded).
--protocol paper (default) follows the paper's text; --protocol authors the authors' script (PROTOCOL.md §6).
"""
import argparse
import json
import os
from pathlib import Path

import diffusers
import numpy as np
import open_clip
import torch
import torchmetrics
import transformers
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from PIL import Image
from tqdm import tqdm

import lora
import outputs
from bootstrap import FID_INF_FRACTIONS, add_bootstrap_flags, add_intervals, check_bootstrap, fid_family
from errors import HelpFormatter, UsageError, check_at_least, exit_on_usage_error
from fid_metrics import WEIGHT_SOURCES, MetricModels, check_metric_files, evaluate_images, load_fid, read_eval_set
from generation import (add_generation_flags, check_checkpoint, check_generation_flags, generate, load_pipeline,
                        save_image, vae_settings)
from low_memory import LowMemory
from models import MODELS, SAMPLING_FLAGS
from partitioned_vae import check_size
from patch_fid import (FEATURES_FILE, PATCH_SEED, PATCH_SIZE, PATCHES_PER_IMAGE, patch_fid_features,
                       recorded_features, save_features)
from tiny_models import TINY_METRIC_FILES, is_stand_in

SETTINGS_FILE = "generation_settings.json"
WHOLE_IMAGE_METRICS = ("fid", "clip_score", "aesthetics", "glcm_score", "compression_ratio")  # one pass computes all
METRICS = WHOLE_IMAGE_METRICS + ("patch_fid",)
PROTOCOL = {  # how each metric is computed, written into metrics.json
    "fid_real_images": "shorter side resized to size (bilinear, antialiased), center crop size x size, uint8",
    "clip_score": "torchmetrics clip_score per image on the full image, mean over images; prompts cut at "
                  "77 CLIP tokens (count: truncated_prompts)",
    "aesthetics": "LAION improved-aesthetic-predictor on the L2-normalised OpenAI CLIP ViT-L/14 image embedding",
    "glcm_score": "detail_metrics.glcm_score (entropy, 64x64 patches), mean over images",
    "compression_ratio": "sum of raw RGB bytes / sum of in-memory JPEG q95 bytes (detail_metrics.compression_ratio)",
    "kid": "torchmetrics KernelInceptionDistance (k = (x.y/d + 1)^3) on one subset of every image, from the FID "
           "features",
    "fid_inf": f"Chong & Forsyth's FID-infinity: FID of subsets of {', '.join(map(str, FID_INF_FRACTIONS))} of the "
               f"prompts (fid_inf_sizes, seed fid_inf_seed), fitted linearly in 1/N and read at 1/N = 0",
    "intervals": "95 % bootstrap over prompts (each with its real image; PROTOCOL.md section 6), fid_bias the "
                 "bootstrap's estimate of FID's finite-sample bias",
}
AUTHORS_PROTOCOL = {  # their generate_and_eval_fid.py + eval.py: what --protocol authors changes
    "glcm_score": "detail_metrics.glcm_score (entropy, 64x64 patches) of the q95 JPEG files, mean over images",
    "compression_ratio": "sum of raw RGB bytes / sum of the q95 JPEG files' sizes on disk (the authors' eval.py)",
    "lossless": "FID, CLIPScore and Aesthetics on the lossless PNGs (the authors' in-memory images)",
}


#################################################################################
#                                  File helpers                                 #
#################################################################################

def image_path(save_path, index, save_format):
    """SAVE_PATH/00042.png: images are named by their line in the eval metadata, so resuming is a file check."""
    return Path(save_path) / f"{index:05d}.{save_format}"


def save_image_atomically(image, path, metadata):
    """save_image into SAVE_PATH/.partial/, then rename: a killed run never leaves a half-written image."""
    partial = path.parent / ".partial" / path.name
    save_image(image, partial, metadata, overwrite=True)
    os.replace(partial.with_suffix(".json"), path.with_suffix(".json"))
    os.replace(partial, path)  # last: the image's presence means "done"


def save_authors_jpeg(png_path, jpg_path):
    """The q95 JPEG the authors' script writes of an image (Pillow's defaults, no metadata), from its lossless PNG."""
    partial = jpg_path.parent / ".partial" / jpg_path.name
    partial.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(png_path) as image:
        image.convert("RGB").save(partial, quality=95)
    os.replace(partial, jpg_path)


def check_generation_settings(save_path, settings):
    """Refuse to resume into a folder whose images were generated with other settings."""
    saved_file = Path(save_path) / SETTINGS_FILE
    if not saved_file.is_file():
        return
    saved = json.loads(saved_file.read_text())
    changed = [f"{key}: {saved.get(key)!r} -> {settings[key]!r}" for key in settings if saved.get(key) != settings[key]]
    if changed:
        raise UsageError(f"{save_path} holds images generated with other settings ({'; '.join(changed)}). "
                         f"Use a new --save_path, or delete that folder to start over.")


def write_results(save_path, metrics, rows):
    """metrics.json and per_image.csv in save_path (each written atomically)."""
    outputs.write_json(Path(save_path) / "metrics.json", metrics, ensure_ascii=False)
    outputs.write_csv(Path(save_path) / "per_image.csv", rows, list(rows[0]))


def check_metrics(text):
    """The --metrics names, in the canonical order; UsageError for an unknown one."""
    names = {name.strip() for name in text.split(",") if name.strip()}
    if not names or names - set(METRICS):
        raise UsageError(f"--metrics {text!r}: choose from {','.join(METRICS)} (comma-separated).")
    return [name for name in METRICS if name in names]


def add_eval_intervals(metrics, rows, features, n_resamples, seed, patches_per_image):
    """`<metric>_ci95` of every metric in `metrics`, prompts resampled; from the Inception features (each prompt with
    its real image, a crop with its image), beside FID and patch-FID: their bias and KID, and FID's FID∞
    (bootstrap.fid_family; not patch-FID's: three crops an image triple the rows, and FID∞'s resamples cost more)."""
    add_intervals(metrics, n_resamples, seed,
                  means={name: [row[name] for row in rows] for name in ("clip_score", "aesthetics", "glcm_score")
                         if name in metrics},
                  ratios={"compression_ratio": ([row["raw_bytes"] for row in rows],
                                                [row["raw_bytes"] / row["compression_ratio"] for row in rows])}
                  if "compression_ratio" in metrics else {})
    for family, real, generated, per_image in (("fid", "inception_real", "inception_generated", 1),
                                               ("patch_fid", "patch_real", "patch_generated", patches_per_image)):
        if family in metrics:
            groups = np.repeat(np.arange(len(features[generated]) // per_image), per_image)
            summary = fid_family(features[real], features[generated], n_resamples, seed, groups, groups, aligned=True,
                                 fractions=FID_INF_FRACTIONS if family == "fid" else None, prefix=family[:-3])
            metrics.update({key: value for key, value in summary.items() if key != family})  # FID: torchmetrics'
    return metrics


#################################################################################
#                                     Main                                      #
#################################################################################

def generation_settings(args):
    """Everything that decides the images of an eval folder (stored with it, compared when a run resumes)."""
    return {"checkpoint_path": str(args.checkpoint_path), "model": args.model, "size": args.size,
            **{flag: getattr(args, flag) for flag in SAMPLING_FLAGS}, "seed": args.seed,
            **vae_settings(args.vae_mode, args.grid, args.pretrained_vae_model_name_or_path),
            "dtype": args.dtype, "json_file": str(Path(args.json_file).resolve()),
            **lora.generation_settings(args.lora_path, args.lora_scale),
            **LowMemory.from_args(args).settings(changes_images=True)}


def main(args):
    """Check the flags, hold --save_path for this run (main process), then generate and score (`run`)."""
    check_generation_flags(args)
    check_at_least(1, size=args.size, max_samples=args.max_samples, eval_batch_size=args.eval_batch_size)
    check_at_least(0, num_workers=args.num_workers)
    check_bootstrap(args.bootstrap)
    check_at_least(1, patch_size=args.patch_size, patches_per_image=args.patches_per_image)
    check_metrics(args.metrics)
    # Without CUDA, processes started by `accelerate launch` / torchrun share the work on the CPU (gloo).
    state = PartialState(cpu=not torch.cuda.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU"))
    with outputs.FolderLock(args.save_path, "--save_path", main=state.is_main_process):
        return run(args, state)


def run(args, state):
    """Generate this process's share of the missing eval images, then score every image (main process)."""
    # Check everything before generating anything:
    if not args.skip_generation and args.checkpoint_path is None:
        raise UsageError("--checkpoint_path is required unless --skip_generation is given.")
    wanted = check_metrics(args.metrics)
    whole = any(name in WHOLE_IMAGE_METRICS for name in wanted)
    metric_files = {flag: getattr(args, flag) for flag in WEIGHT_SOURCES if whole or flag == "inception_weights"}
    check_metric_files(metric_files)
    check_size(args.size, args.size)
    samples = read_eval_set(args.json_file, args.max_samples)
    if len(samples) < 2:
        raise UsageError("FID needs at least 2 images: use --max_samples 2 or more.")
    if args.protocol == "authors" and args.save_format != "png":
        raise UsageError("--protocol authors keeps each image as a lossless PNG and writes its q95 JPEG itself: "
                         "leave out --save_format.")
    paths = [image_path(args.save_path, s["index"], args.save_format) for s in samples]
    detail_paths = [path.with_suffix(".jpg") for path in paths] if args.protocol == "authors" else paths
    settings = generation_settings(args)

    if not args.skip_generation:
        check_checkpoint(args.model, args.checkpoint_path)
        check_generation_settings(args.save_path, settings)
    # Loaded now, on the CPU, so that a wrong weights file is reported before hours of generation:
    models = (MetricModels(**metric_files, fid_feature=args.fid_feature) if whole else
              load_fid(args.inception_weights, feature=args.fid_feature)) if state.is_main_process else None

    # Generate the images this process owns:
    if not args.skip_generation:
        todo = [i for i, path in enumerate(paths) if not path.is_file()]
        state.wait_for_everyone()  # every process has listed the folder before any image is written
        if state.is_main_process:
            Path(args.save_path).mkdir(parents=True, exist_ok=True)
            outputs.write_json(Path(args.save_path) / SETTINGS_FILE, settings)
        mine = todo[state.process_index::state.num_processes]
        if mine:
            pipe = load_pipeline(args.model, args.checkpoint_path, args.vae_mode, args.grid, args.dtype, state.device,
                                 args.pretrained_vae_model_name_or_path, args.lora_path, args.lora_scale,
                                 LowMemory.from_args(args))
            pipe.set_progress_bar_config(disable=True)  # one bar per process, over its images, with an ETA
            for i in tqdm(mine, desc=f"generating (process {state.process_index})", unit="image",
                          position=state.process_index):
                image, _ = generate(pipe, samples[i]["prompt"], args.size, args.size, args.num_inference_steps,
                                    args.guidance_scale, args.seed, args.max_sequence_length)
                save_image_atomically(image, paths[i], {"prompt": samples[i]["prompt"], "index": i, **settings})
            del pipe
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        state.wait_for_everyone()
    if args.protocol == "authors" and state.is_main_process:
        for path, jpg in zip(paths, detail_paths):
            if path.is_file() and not jpg.is_file():
                save_authors_jpeg(path, jpg)

    # Evaluate every image, once:
    if not state.is_main_process:
        return None
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise UsageError(f"{len(missing)} of {len(paths)} images are missing in {args.save_path}, e.g. {missing[0]}: "
                         f"run without --skip_generation to generate them (images are named 00000.{args.save_format}, "
                         f"00001.{args.save_format}, ... after their line in --json_file).")
    models, metrics, rows = models.to(state.device), {"num_images": len(paths)}, None
    features = {"files": np.array([path.name for path in paths])}  # the row order of every feature array
    if whole:
        with recorded_features(models.fid) as inception:
            metrics, rows = evaluate_images(samples, paths, args.size, models, args.eval_batch_size,
                                            args.num_workers, detail_paths=detail_paths,
                                            cr_mode="file" if args.protocol == "authors" else "encode")
        features.update(inception_real=inception["real"], inception_generated=inception["generated"])
    if "patch_fid" in wanted:
        metric = models.fid if whole else models
        metrics["patch_fid"], patches = patch_fid_features(samples, paths, metric, args.patch_size,
                                                           args.patches_per_image, args.patch_seed,
                                                           args.eval_batch_size, args.num_workers)
        features.update(patch_real=patches["real"], patch_generated=patches["generated"])
    add_eval_intervals(metrics, rows, features, args.bootstrap, args.bootstrap_seed, args.patches_per_image)
    save_features(Path(args.save_path) / FEATURES_FILE, **features)
    metrics["settings"] = {**vars(args), "num_processes": state.num_processes}
    metrics["stand_in_metrics"] = any(is_stand_in(getattr(args, flag)) for flag in TINY_METRIC_FILES)
    metrics["protocol"] = {**PROTOCOL, "fid_feature": f"torchmetrics FrechetInceptionDistance, {args.fid_feature}-d "
                                                      f"Inception features, antialias=False (torch-fidelity's resize "
                                                      f"to 299)",
                           **(AUTHORS_PROTOCOL if args.protocol == "authors" else {})}
    metrics["versions"] = {"torch": torch.__version__, "torchmetrics": torchmetrics.__version__,
                           "transformers": transformers.__version__, "open_clip": open_clip.__version__,
                           "diffusers": diffusers.__version__}
    if "patch_fid" in wanted:
        metrics["protocol"]["patch_fid"] = (f"FID (same Inception) over {args.patches_per_image} random "
                                            f"{args.patch_size}x{args.patch_size} crop(s) per image at native "
                                            f"resolution, seed {args.patch_seed} (patch_fid.py)")
    write_results(args.save_path, metrics, rows or [{"file": name} for name in features["files"]])
    print(json.dumps({k: metrics[k] for k in (*METRICS, "kid", "fid_inf", "patch_kid", "patch_fid_inf", "num_images",
                                              "truncated_prompts", "stand_in_metrics") if k in metrics}))
    if metrics["stand_in_metrics"]:
        print("stand_in_metrics: the metric networks are tiny_models.py's random stand-ins: FID, CLIPScore and "
              "Aesthetics here are meaningless")
    return metrics


def parse_args(argv=None):
    """The flags; the defaults are the paper's evaluation settings, or the authors' (PROTOCOL.md §6)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--protocol", choices=("paper", "authors"), default="paper",
                        help="paper: its text (SD3 28 steps), every metric on lossless PNGs; authors: their script "
                             "(50 steps for both models), FID/CLIPScore/Aesthetics on the PNGs, GLCM and the on-disk "
                             "Compression Ratio on q95 JPEGs")
    parser.add_argument("--checkpoint_path", default=None, help="local diffusers pipeline folder (fine-tuned or stock)")
    parser.add_argument("--model", choices=tuple(MODELS), default="sd3")
    parser.add_argument("--json_file", required=True, help="eval metadata.jsonl (file_name, text), e.g. "
                        "./data/Aesthetic-4K/eval/size_2048/metadata.jsonl; real images next to it")
    parser.add_argument("--size", type=int, default=2048)  # Aesthetic-Eval@2048
    parser.add_argument("--save_path", required=True, help="folder for the images, metrics.json and per_image.csv")
    add_generation_flags(parser)  # every prompt gets a CPU generator seeded with --seed
    parser.add_argument("--max_samples", type=int, default=None, help="only the first N prompts")
    parser.add_argument("--skip_generation", action="store_true", help="only evaluate the images in --save_path")
    parser.add_argument("--fid_feature", type=int, choices=(64, 192, 768, 2048), default=2048,
                        help="Inception layer: 2048 (pool) is the standard FID; the smaller ones are quick checks")
    parser.add_argument("--metrics", default=",".join(WHOLE_IMAGE_METRICS),
                        help=f"comma list of {','.join(METRICS)}; the first five come from one pass over the images "
                             f"(naming any computes all five), patch_fid adds a pass over crops")
    parser.add_argument("--patch_size", type=int, default=PATCH_SIZE, help="patch-FID crop side, native pixels")
    parser.add_argument("--patches_per_image", type=int, default=PATCHES_PER_IMAGE, help="patch-FID crops per image")
    parser.add_argument("--patch_seed", type=int, default=PATCH_SEED, help="seed of the patch-FID crop positions")
    add_bootstrap_flags(parser)
    parser.add_argument("--eval_batch_size", type=int, default=8, help="images held in memory while evaluating")
    parser.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="processes decoding images while evaluating (at most 4, at most the cores)")
    parser.add_argument("--inception_weights", default=None, help="weights-inception-2015-12-05-6726825d.pth")
    parser.add_argument("--clip_score_model", default=None, help="local openai/clip-vit-base-patch16 folder")
    parser.add_argument("--aesthetic_clip", default=None,
                        help="OpenAI CLIP ViT-L/14 weights (ViT-L-14.pt or an open_clip file / folder)")
    parser.add_argument("--aesthetic_head", default=None, help="sac+logos+ava1-l14-linearMSE.pth")
    args = parser.parse_args(argv)
    spec = MODELS[args.model]
    sampling = spec.authors_evaluation if args.protocol == "authors" else spec.evaluation
    for flag in SAMPLING_FLAGS:
        if getattr(args, flag) is None:
            setattr(args, flag, getattr(sampling, flag))
    return args


if __name__ == "__main__":
    exit_on_usage_error("generate_and_eval_fid.py", main, parse_args())
