"""generate_and_eval_fid.py: end to end on tiny models, resumable, sharded, and each metric against a reference."""
import csv
import io
import json
import math
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from detail_metrics import compression_ratio, glcm_score
from errors import UsageError
from fid_metrics import add_fid_images, fid_tensor, load_fid, read_eval_set
from generate_and_eval_fid import main, parse_args
from tiny_models import save_tiny_metric_models

SIZE = 64
METRICS = ("fid", "clip_score", "aesthetics", "glcm_score", "compression_ratio")
LONG_PROMPT = " ".join(["a detailed photo of a red flower in the green grass"] * 12)  # > 77 CLIP tokens
PROMPTS = ["a photo of an astronaut", "a cup of coffee on the table", "a cat sitting on the grass", LONG_PROMPT]
IMAGES = ("astronaut", "coffee", "chelsea", "rocket")  # square and non-square, 300 to 640 pixels a side


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def metric_files(tmp_path_factory):
    """Random stand-ins of the four metric models, in the formats of the real downloads."""
    return save_tiny_metric_models(tmp_path_factory.mktemp("metrics"))


@pytest.fixture(scope="module")
def eval_set(tmp_path_factory):
    """A 4-prompt eval set in the imagefolder layout: metadata.jsonl + images/ (real photos from skimage)."""
    root = tmp_path_factory.mktemp("eval") / "size_64"
    (root / "images").mkdir(parents=True)
    with open(root / "metadata.jsonl", "w") as f:
        for name, prompt in zip(IMAGES, PROMPTS):
            Image.fromarray(getattr(data, name)()).save(root / "images" / f"{name}.jpg", quality=95)
            f.write(json.dumps({"file_name": f"images/{name}.jpg", "text": prompt}) + "\n")
    return root / "metadata.jsonl"


def _argv(ckpt, eval_set, save_path, metric_files, *extra):
    """Command line of a small, fast run (2 steps, fp32 on the CPU, 64-d FID)."""
    argv = ["--checkpoint_path", str(ckpt), "--model", "sd3", "--json_file", str(eval_set), "--size", str(SIZE),
            "--save_path", str(save_path), "--num_inference_steps", "2", "--dtype", "fp32", "--eval_batch_size", "3",
            "--num_workers", "1", "--fid_feature", "64"]  # 2048-d FID is tested on its own: the full Inception is slow
    for flag, path in metric_files.items():
        argv += [f"--{flag}", str(path)]
    return argv + list(extra)


@pytest.fixture(scope="module")
def single_run(tiny_ckpts, eval_set, metric_files, tmp_path_factory):
    """One in-process run on a fresh folder: (save_path, metrics)."""
    save_path = tmp_path_factory.mktemp("run") / "out"
    args = parse_args(_argv(tiny_ckpts["sd3"], eval_set, save_path, metric_files))
    return save_path, main(args)


def _pixels(path):
    """An image file's pixels."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


#################################################################################
#                                  End to end                                   #
#################################################################################

def test_run_writes_size_x_size_images_metrics_and_csv(single_run):
    save_path, metrics = single_run
    images = sorted(save_path.glob("*.png"))
    assert [p.name for p in images] == [f"{i:05d}.png" for i in range(4)]
    assert all(_pixels(p).shape == (SIZE, SIZE, 3) for p in images)
    assert not list(save_path.glob(".partial/*"))  # temporary files were renamed
    sidecar = json.loads((save_path / "00003.json").read_text())
    assert sidecar["image"] == "00003.png" and sidecar["prompt"] == LONG_PROMPT and sidecar["seed"] == 0
    saved = json.loads((save_path / "metrics.json").read_text())
    assert all(math.isfinite(saved[key]) for key in METRICS)
    assert saved["fid"] > 0 and saved["num_images"] == 4
    assert saved["stand_in_metrics"] is True  # tiny_models' random networks: the numbers say nothing
    assert saved["truncated_prompts"] == 1  # only LONG_PROMPT exceeds 77 CLIP tokens
    assert saved["settings"]["size"] == SIZE and saved["settings"]["num_inference_steps"] == 2
    with open(save_path / "per_image.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["file"] for row in rows] == [p.name for p in images]
    assert [row["prompt"] for row in rows] == PROMPTS
    assert np.mean([float(row["aesthetics"]) for row in rows]) == pytest.approx(saved["aesthetics"])
    assert saved["compression_ratio"] == pytest.approx(compression_ratio(images))  # eval.py over the whole set


def test_second_run_generates_nothing_and_reproduces_the_metrics(single_run, tiny_ckpts, eval_set, metric_files):
    save_path, metrics = single_run
    stamps = {p.name: p.stat().st_mtime_ns for p in save_path.glob("0*.png")}
    args = parse_args(_argv(tiny_ckpts["sd3"], eval_set, save_path, metric_files))
    again = main(args)
    assert {p.name: p.stat().st_mtime_ns for p in save_path.glob("0*.png")} == stamps
    assert {k: again[k] for k in METRICS} == {k: metrics[k] for k in METRICS}


def test_resuming_with_other_settings_is_refused(single_run, tiny_ckpts, eval_set, metric_files):
    save_path, _ = single_run
    args = parse_args(_argv(tiny_ckpts["sd3"], eval_set, save_path, metric_files, "--seed", "1"))
    with pytest.raises(ValueError, match="seed: 0 -> 1"):
        main(args)


def _launch(num_processes, argv, repo_root):
    """generate_and_eval_fid.py under `accelerate launch` with NUM processes on the CPU, one thread each."""
    # `--multi_gpu` is how accelerate starts several local processes (torchrun); without CUDA they run on the CPU.
    with socket.socket() as probe:  # a free port: other test runs on this machine may hold accelerate's default
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    spread = ["--multi_gpu", "--num_processes", str(num_processes)] if num_processes > 1 else ["--num_processes", "1"]
    command = [sys.executable, "-m", "accelerate.commands.launch", *spread, "--num_machines", "1",
               "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
               str(repo_root / "generate_and_eval_fid.py"), *argv]
    # MKL_CBWR: MKL chooses its kernels by CPU and by the memory alignment of each buffer, so processes with other
    # allocation histories (a gloo group, another shard) may round differently; COMPATIBLE fixes one code path.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "MKL_CBWR": "COMPATIBLE"}
    result = subprocess.run(command, cwd=repo_root, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_two_processes_resume_a_killed_run_with_the_same_images_and_metrics(single_run, tiny_ckpts, eval_set,
                                                                           metric_files, tmp_path, repo_root):
    """Sharding changes no pixel: two processes resuming a killed run equal one process resuming it the same way.

    Both are launched alike (accelerate, one thread each, MKL's reproducible mode). Without that, a process with
    another allocation history (the in-process `single_run`, or a rank of a gloo group) can differ in 1-2 of
    12,288 pixel values by 1 through MKL's alignment-dependent kernels: a property of MKL, not of the sharding.
    """
    save_path, _ = single_run
    runs = {}
    for num_processes in (1, 2):
        out = runs[num_processes] = tmp_path / f"run{num_processes}"
        out.mkdir()
        for name in ("00000.png", "00000.json", "generation_settings.json"):  # a run killed after its first image
            out.joinpath(name).write_bytes(save_path.joinpath(name).read_bytes())
        out.joinpath(".partial").mkdir()
        out.joinpath(".partial", "00001.png").write_bytes(b"half an image")
        first = out.joinpath("00000.png").stat().st_mtime_ns
        _launch(num_processes, _argv(tiny_ckpts["sd3"], eval_set, out, metric_files), repo_root)
        assert out.joinpath("00000.png").stat().st_mtime_ns == first  # kept, not generated again
        assert not list(out.glob(".partial/*"))  # the stale half image was replaced by a whole one
    for i in range(4):
        np.testing.assert_array_equal(_pixels(runs[2] / f"{i:05d}.png"), _pixels(runs[1] / f"{i:05d}.png"))
    one, two = (json.loads((runs[n] / "metrics.json").read_text()) for n in (1, 2))
    assert (one["settings"]["num_processes"], two["settings"]["num_processes"]) == (1, 2)
    for key in METRICS:
        assert two[key] == pytest.approx(one[key], rel=1e-6, abs=1e-9)


def test_missing_or_wrong_metric_file_is_reported_before_generation(tiny_ckpts, eval_set, metric_files, tmp_path):
    head = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    args = parse_args(_argv(tiny_ckpts["sd3"], eval_set, tmp_path / "out", {**metric_files, "aesthetic_head": head}))
    with pytest.raises(UsageError) as error:
        main(args)
    assert "--aesthetic_head" in str(error.value) and "improved-aesthetic-predictor" in str(error.value)
    torch.save({"weight": torch.zeros(1, 768)}, head)  # a file, but not the aesthetic MLP
    with pytest.raises(ValueError, match="--aesthetic_head .* is not the 768-input aesthetic MLP"):
        main(args)
    assert not (tmp_path / "out").exists()  # nothing was generated


def test_metrics_from_weight_files_that_are_not_stand_ins_say_so(single_run, eval_set, metric_files, tmp_path):
    save_path, _ = single_run
    copies = {}
    for flag, path in metric_files.items():  # the same files in a folder without the stand-ins' marker
        copies[flag] = tmp_path / "weights" / path.name
        copies[flag].parent.mkdir(exist_ok=True)
        (shutil.copytree if path.is_dir() else shutil.copy)(path, copies[flag])
    scored = tmp_path / "scored"
    shutil.copytree(save_path, scored)
    metrics = main(parse_args(_argv("unused", eval_set, scored, copies, "--skip_generation")))
    assert metrics["stand_in_metrics"] is False


def test_num_workers_defaults_to_at_most_the_cores(monkeypatch):
    for cores, expected in ((1, 1), (2, 2), (64, 4)):
        monkeypatch.setattr(os, "cpu_count", lambda: cores)
        assert parse_args(["--json_file", "j", "--save_path", "s"]).num_workers == expected


def test_skip_generation_needs_every_image(single_run, eval_set, metric_files, tmp_path):
    args = parse_args(_argv("unused", eval_set, tmp_path, metric_files, "--skip_generation"))
    with pytest.raises(ValueError, match="4 of 4 images are missing"):
        main(args)


#################################################################################
#                                   Metrics                                     #
#################################################################################

def test_real_image_preprocessing_matches_pil_resize_and_center_crop():
    rng = np.random.default_rng(0)
    for height, width in ((90, 157), (157, 90)):  # landscape and portrait; random pixels show any 1-pixel shift
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        short, long = min(height, width), max(height, width)
        new_long = int(SIZE * long / short)  # 111
        new_w, new_h = (new_long, SIZE) if width > height else (SIZE, new_long)
        left, top = int(round((new_w - SIZE) / 2)), int(round((new_h - SIZE) / 2))
        reference = np.asarray(image.resize((new_w, new_h), Image.BILINEAR).crop((left, top, left + SIZE, top + SIZE)))
        ours = fid_tensor(image, SIZE).permute(1, 2, 0).numpy()
        assert ours.dtype == np.uint8 and ours.shape == (SIZE, SIZE, 3)
        difference = np.abs(ours.astype(int) - reference.astype(int))
        assert difference.max() <= 1 and difference.mean() < 0.5  # rounding only: a shifted crop differs by ~85
    square = Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    np.testing.assert_array_equal(fid_tensor(square, SIZE).permute(1, 2, 0).numpy(), np.asarray(square))


def test_fid_of_a_set_against_itself_is_zero(metric_files):
    photos = [Image.fromarray(getattr(data, name)()) for name in IMAGES[:3]]
    fid = load_fid(metric_files["inception_weights"])  # 2048-d, the paper's FID
    add_fid_images(fid, photos, SIZE, real=True)
    add_fid_images(fid, photos, SIZE, real=False)
    # Scale of the terms that must cancel: FID = |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2), here tr S1 = tr S2.
    n, total, mean = len(photos), fid.real_features_cov_sum.trace(), fid.real_features_sum / len(photos)
    scale = 2 * float(total - n * mean @ mean) / (n - 1)
    assert fid.real_features_sum.shape == (2048,) and scale > 1
    assert abs(float(fid.compute())) < 1e-5 * scale


def test_eval_set_reads_prompts_and_real_images_next_to_the_jsonl(eval_set, tmp_path):
    samples = read_eval_set(eval_set, max_samples=3)
    assert [s["prompt"] for s in samples] == PROMPTS[:3]
    assert samples[1]["real_image"] == eval_set.parent / "images" / "coffee.jpg"
    broken = tmp_path / "metadata.jsonl"
    broken.write_text(json.dumps({"file_name": "images/missing.jpg", "text": "a cat"}) + "\n")
    with pytest.raises(UsageError, match="missing.jpg"):
        read_eval_set(broken)


#################################################################################
#                       --protocol authors: their script's mix                  #
#################################################################################

def test_protocol_authors_takes_their_steps_and_t5_lengths():
    common = ["--json_file", "eval.jsonl", "--save_path", "out"]
    for model, tokens in (("sd3", 77), ("flux", 512)):
        args = parse_args(common + ["--model", model, "--protocol", "authors"])
        assert (args.num_inference_steps, args.guidance_scale, args.max_sequence_length) == (50, 7.0, tokens)
    paper = parse_args(common)
    assert (paper.protocol, paper.num_inference_steps) == ("paper", 28)  # the paper's text for SD3


def test_protocol_authors_scores_glcm_and_cr_on_q95_jpegs_and_the_rest_on_lossless_pixels(single_run, tiny_ckpts,
                                                                                           eval_set, metric_files,
                                                                                           tmp_path):
    save_path, paper = single_run
    out = tmp_path / "authors"
    shutil.copytree(save_path, out)  # the same PNGs: only the JPEGs are new
    args = parse_args(_argv(tiny_ckpts["sd3"], eval_set, out, metric_files, "--protocol", "authors"))
    authors = main(args)
    pngs = sorted(out.glob("0*.png"))
    jpgs = [png.with_suffix(".jpg") for png in pngs]
    for png, jpg in zip(pngs, jpgs):  # what their `image.save(path, quality=95)` writes: Pillow's defaults, no metadata
        encoded = io.BytesIO()
        Image.open(png).convert("RGB").save(encoded, format="JPEG", quality=95)
        assert jpg.read_bytes() == encoded.getvalue()
    for key in ("fid", "clip_score", "aesthetics"):  # on the lossless pixels, as their in-memory images
        assert authors[key] == pytest.approx(paper[key], rel=1e-9, abs=1e-9)
    assert authors["glcm_score"] == pytest.approx(np.mean([glcm_score(jpg) for jpg in jpgs]), abs=1e-12)
    assert authors["glcm_score"] != pytest.approx(paper["glcm_score"], abs=1e-6)
    raw = sum(SIZE * SIZE * 3 for _ in jpgs)
    assert authors["compression_ratio"] == pytest.approx(raw / sum(os.path.getsize(jpg) for jpg in jpgs), rel=1e-12)
    assert json.loads((out / "metrics.json").read_text())["settings"]["protocol"] == "authors"
