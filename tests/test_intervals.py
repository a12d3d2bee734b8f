"""The `<metric>_ci95` keys of eval.py, eval_vae.py and generate_and_eval_fid.py, patch-FID and the saved features."""
import csv
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

import eval_vae
from errors import UsageError
from bootstrap import FidBootstrap, fid_ci
from generate_and_eval_fid import main as eval_fid_main
from generate_and_eval_fid import parse_args as eval_fid_args
from patch_fid import load_features
from test_bootstrap import direct_kid
from tiny_models import build_tiny_inception_state_dict, build_tiny_vae, save_tiny_metric_models

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def direct_percentile_interval(values, n_resamples, seed):
    """The bootstrap written out: index draws with replacement from the same generator, a mean per draw."""
    values = np.asarray(values, dtype=np.float64)
    draws = np.random.default_rng(seed).integers(0, len(values), size=(n_resamples, len(values)))
    return list(np.percentile(values[draws].mean(axis=1), [2.5, 97.5]))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Four photos, each 160×192, as PNGs."""
    root = tmp_path_factory.mktemp("photos") / "images"
    root.mkdir()
    for name in PHOTOS:
        Image.fromarray(getattr(data, name)()).convert("RGB").resize((160, 192)).save(root / f"{name}.png")
    return root


def test_eval_py_writes_intervals_and_keeps_its_values(photos, repo_root, tmp_path):
    printed = {}

    def run(*extra):
        out = tmp_path / f"summary{len(extra)}.json"
        printed[len(extra)] = subprocess.run(
            [sys.executable, str(repo_root / "eval.py"), "--img_root", str(photos), "--workers", "1", "--output_json",
             str(out), "--output_csv", str(tmp_path / "rows.csv"), *extra], check=True, capture_output=True,
            text=True).stdout
        return json.loads(out.read_text())

    off, on = run("--bootstrap", "0"), run("--bootstrap", "300", "--bootstrap_seed", "3")
    shown = [f"[{float(f'{lo:.4g}')!r}, {float(f'{hi:.4g}')!r}]".replace(".0,", ",").replace(".0]", "]")
             for lo, hi in (on["glcm_score_ci95"], on["compression_ratio_ci95"])]
    assert f"GLCM {shown[0]}, CR {shown[1]}" in printed[4]  # the terminal gets 4 significant digits
    assert off["bootstrap"] == 0 and not any(key.endswith("_ci95") for key in off)
    assert {k: v for k, v in on.items() if k not in ("glcm_score_ci95", "compression_ratio_ci95", "bootstrap",
                                                    "bootstrap_seed")} == {k: v for k, v in off.items()
                                                                           if k != "bootstrap"}
    assert on["bootstrap"] == 300 and on["bootstrap_seed"] == 3
    with open(tmp_path / "rows.csv") as handle:
        rows = list(csv.DictReader(handle))
    expected = direct_percentile_interval([float(r["glcm"]) for r in rows], 300, 3)
    assert on["glcm_score_ci95"] == pytest.approx(expected, rel=1e-12)
    low, high = on["compression_ratio_ci95"]
    assert low <= on["compression_ratio"] <= high


def test_eval_vae_writes_intervals_and_rfid_from_its_saved_features(photos, tmp_path):
    build_tiny_vae("sd3", seed=0).save_pretrained(tmp_path / "vae")
    torch.save(build_tiny_inception_state_dict(seed=2), tmp_path / "inception.pth")
    argv = ["--vae", str(tmp_path / "vae"), "--data_dir", str(photos), "--size", "64", "--output_json",
            str(tmp_path / "vae.json"), "--inception_weights", str(tmp_path / "inception.pth"), "--device", "cpu",
            "--num_workers", "0", "--no_progress", "--fid_feature", "64", "--metrics", "psnr,rfid",
            "--bootstrap", "200"]
    summary = eval_vae.main(eval_vae.parse_args(argv))
    with open(tmp_path / "vae.csv") as handle:
        psnr = [float(row["psnr"]) for row in csv.DictReader(handle)]
    assert summary["psnr_ci95"] == pytest.approx(direct_percentile_interval(psnr, 200, 0), rel=1e-12)
    features = load_features(tmp_path / "vae.csv.fid_features.npz")
    assert features["real"].shape == features["generated"].shape == (len(PHOTOS), 64)
    assert summary["rfid"] == pytest.approx(FidBootstrap(features["real"], features["generated"]).fid(), rel=1e-4)
    assert summary["rfid_ci95"][0] <= summary["rfid"] <= summary["rfid_ci95"][1]
    # Each image drawn with its reconstruction (fid_ci's joint draw is checked against one written out in
    # tests/test_bootstrap.py):
    assert summary["rfid_ci95"] == pytest.approx(fid_ci(features["real"], features["generated"], 200, 0,
                                                        aligned=True)[1], rel=1e-9)
    assert summary["bootstrap"] == 200 and "nmse_ci95" not in summary
    with pytest.raises(UsageError, match="--bootstrap 20: give 0 \\(no intervals\\) or at least 200"):
        eval_vae.main(eval_vae.parse_args([*argv[:-2], "--bootstrap", "20"]))


@pytest.fixture(scope="module")
def eval_folder(photos, tmp_path_factory):
    """(argv maker, folder): an eval set of the four photos, 'generated' images 00000.png... = the photos flipped."""
    root = tmp_path_factory.mktemp("eval_fid")
    with open(root / "metadata.jsonl", "w") as handle:
        for name in PHOTOS:
            handle.write(json.dumps({"file_name": f"images/{name}.png", "text": f"a photo of {name}"}) + "\n")
    shutil.copytree(photos, root / "images")
    files = save_tiny_metric_models(root / "metrics")
    generated = root / "generated"
    generated.mkdir()
    for i, name in enumerate(PHOTOS):
        image = Image.open(photos / f"{name}.png").transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize((64, 64))
        image.save(generated / f"{i:05d}.png")

    def argv(save_path, *extra):
        shutil.copytree(generated, save_path, dirs_exist_ok=True)
        flags = [f for flag, path in files.items() for f in (f"--{flag}", str(path))]
        return ["--json_file", str(root / "metadata.jsonl"), "--size", "64", "--save_path", str(save_path),
                "--skip_generation", "--fid_feature", "64", "--eval_batch_size", "2", "--num_workers", "0", *flags,
                *extra]

    return argv


def test_eval_fid_adds_intervals_patch_fid_and_features_keeping_its_values(eval_folder, tmp_path):
    plain = eval_fid_main(eval_fid_args(eval_folder(tmp_path / "plain", "--bootstrap", "0")))
    both = eval_fid_main(eval_fid_args(eval_folder(
        tmp_path / "both", "--metrics", "fid,clip_score,aesthetics,glcm_score,compression_ratio,patch_fid",
        "--patch_size", "48", "--patches_per_image", "3", "--bootstrap", "200")))
    for key in ("fid", "clip_score", "aesthetics", "glcm_score", "compression_ratio", "num_images"):
        assert both[key] == plain[key]  # existing keys keep their values
        if key != "num_images":
            assert key + "_ci95" in both and key + "_ci95" not in plain
    features = load_features(tmp_path / "both" / "features.npz")
    assert list(features["files"]) == [f"{i:05d}.png" for i in range(4)]
    assert features["inception_real"].shape == features["inception_generated"].shape == (4, 64)
    assert features["patch_real"].shape == features["patch_generated"].shape == (12, 64)
    assert both["fid"] == pytest.approx(FidBootstrap(features["inception_real"],
                                                     features["inception_generated"]).fid(), rel=1e-4)
    assert both["patch_fid"] == pytest.approx(FidBootstrap(features["patch_real"],
                                                           features["patch_generated"]).fid(), rel=1e-4)
    assert both["patch_fid_ci95"][0] <= both["patch_fid"] <= both["patch_fid_ci95"][1]
    for prefix, real, gen in (("", "inception_real", "inception_generated"), ("patch_", "patch_real", "patch_generated")):
        assert both[f"{prefix}kid"] == pytest.approx(direct_kid(features[real], features[gen]), rel=1e-9)
        assert both[f"{prefix}kid"] == plain.get(f"{prefix}kid", both[f"{prefix}kid"])  # no resampling in the value
        for key in ("kid_ci95", "fid_bias"):
            assert isinstance(both[prefix + key], (float, list)), prefix + key
    assert isinstance(both["fid_inf"], float) and both["fid_inf_ci95"][0] <= both["fid_inf"] <= both["fid_inf_ci95"][1]
    assert both["fid_inf_sizes"] == [2, 2, 3, 3, 4, 4] and both["fid_inf_seed"] == 0
    assert "patch_fid_inf" not in both  # not for patch-FID (PROTOCOL.md §6)
    assert "kid" in plain and "fid_inf" in plain and "kid_ci95" not in plain and "fid_bias" not in plain
    # Each prompt drawn with its real image, a crop with its image (the joint draw: tests/test_bootstrap.py):
    groups = np.repeat(np.arange(4), 3)
    assert both["fid_ci95"] == pytest.approx(fid_ci(features["inception_real"], features["inception_generated"], 200,
                                                    0, aligned=True)[1], rel=1e-9)
    assert both["patch_fid_ci95"] == pytest.approx(fid_ci(features["patch_real"], features["patch_generated"], 200, 0,
                                                          real_groups=groups, gen_groups=groups, aligned=True)[1],
                                                   rel=1e-9)
    assert "48x48" in json.loads((tmp_path / "both" / "metrics.json").read_text())["protocol"]["patch_fid"]


def test_unknown_metric_is_a_usage_error(eval_folder, tmp_path):
    with pytest.raises(UsageError, match="--metrics 'fid,sharpness': choose from fid,"):
        eval_fid_main(eval_fid_args(eval_folder(tmp_path / "x", "--metrics", "fid,sharpness")))
    for bad in ("-1", "1", "199"):  # 0 (no intervals) or at least 200
        with pytest.raises(UsageError, match=f"--bootstrap {bad}: give 0 \\(no intervals\\) or at least 200"):
            eval_fid_main(eval_fid_args(eval_folder(tmp_path / "y", "--bootstrap", bad)))


def test_patch_fid_defaults_are_ultrapixels_protocol():
    """UltraPixel's authors: crops the size of the FID extractor's input (Inception v3: 299), three per image."""
    args = eval_fid_args(["--json_file", "m.jsonl", "--save_path", "out"])
    assert (args.patch_size, args.patches_per_image, args.patch_seed) == (299, 3, 0)
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    assert args.patch_size == FeatureExtractorInceptionV3.INPUT_IMAGE_SIZE  # the FID extractor's input, 1:1


def test_patch_fid_alone_is_deterministic_per_seed(eval_folder, tmp_path):
    def patch_run(name, seed):
        argv = eval_folder(tmp_path / name, "--metrics", "patch_fid", "--patch_size", "40", "--patch_seed", seed,
                           "--bootstrap", "0")
        return eval_fid_main(eval_fid_args(argv)), load_features(tmp_path / name / "features.npz")

    (first, f1), (again, f2), (_, f3) = patch_run("a", "0"), patch_run("b", "0"), patch_run("c", "1")
    assert set(first) >= {"patch_fid", "num_images"} and "fid" not in first
    assert first["patch_fid"] == again["patch_fid"] and np.array_equal(f1["patch_generated"], f2["patch_generated"])
    assert not np.array_equal(f1["patch_real"], f3["patch_real"])
