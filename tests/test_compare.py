"""compare.py: folder values equal the metrics computed directly, identical folders differ by exactly zero, a blurred
copy loses GLCM significantly, FID-family numbers come from the saved features, and the outputs have the set shape."""
import csv
import json
import os

import numpy as np
import pytest
import scipy.linalg
from PIL import Image, ImageFilter
from skimage import data

import compare
from bootstrap import fid_ci
from detail_metrics import compression_ratio, glcm_score
from errors import UsageError
from patch_fid import save_features

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")
N = 12  # two 128² crops of each photo


def direct_fid(real, generated):
    """The textbook Fréchet distance (numpy moments, scipy's matrix square root)."""
    s1, s2 = np.cov(real, rowvar=False), np.cov(generated, rowvar=False)
    return float(((real.mean(0) - generated.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2)
                 - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{"base", "copy", "blurred"}: 12 photo crops, the same files copied, and blurred (plus one unpaired file)."""
    root = tmp_path_factory.mktemp("folders")
    paths = {name: root / name for name in ("base", "copy", "blurred")}
    for path in paths.values():
        path.mkdir()
    for i in range(N):
        photo = Image.fromarray(getattr(data, PHOTOS[i % len(PHOTOS)])()).convert("RGB")
        image = photo.crop((i // len(PHOTOS) * 64, 0, i // len(PHOTOS) * 64 + 128, 128))
        image.save(paths["base"] / f"{i:05d}.png")
        image.save(paths["copy"] / f"{i:05d}.png")
        image.filter(ImageFilter.GaussianBlur(1.5)).save(paths["blurred"] / f"{i:05d}.png")
    image.save(paths["blurred"] / "extra.png")
    return paths


def run(folders, out, *names, extra=()):
    """compare.main over the named folders, without the report."""
    argv = ["--folders", *(str(folders[n]) for n in names), "--out", str(out), "--bootstrap", "400",
            "--workers", "1", "--no_report", *extra]
    return compare.main(compare.parse_args(argv))


@pytest.fixture(scope="module")
def result(folders, tmp_path_factory):
    """(out folder, comparison) of base vs copy vs blurred."""
    out = tmp_path_factory.mktemp("cmp")
    return out, run(folders, out, "base", "copy", "blurred")


def pair(comparison, a, b, metric):
    """The pairs entry of (a, b, metric)."""
    return next(p for p in comparison["pairs"] if (p["a"], p["b"], p["metric"]) == (a, b, metric))


def test_folder_values_equal_the_metrics_computed_directly(folders, result):
    _, comparison = result
    paths = sorted(folders["base"].glob("*.png"))
    base = comparison["folders"]["base"]
    assert base["glcm_score"]["value"] == pytest.approx(np.mean([glcm_score(p) for p in paths]), rel=1e-12)
    assert base["compression_ratio"]["value"] == pytest.approx(compression_ratio(paths), rel=1e-12)
    for entry in base.values():
        assert entry["ci95"][0] < entry["value"] < entry["ci95"][1]


def test_identical_folders_differ_by_exactly_zero_and_not_significantly(result):
    _, comparison = result
    for metric in ("glcm_score", "compression_ratio"):
        p = pair(comparison, "base", "copy", metric)
        assert p["difference"] == 0 and p["ci95"] == [0.0, 0.0] and p["significant"] is False
        assert p["n_pairs"] == N


def test_a_blurred_copy_has_a_significant_glcm_drop_and_compresses_better(folders, result):
    _, comparison = result
    glcm = pair(comparison, "base", "blurred", "glcm_score")
    paths = sorted(folders["base"].glob("0*.png"))
    expected = np.mean([glcm_score(folders["blurred"] / p.name) - glcm_score(p) for p in paths])
    assert glcm["difference"] == pytest.approx(expected, rel=1e-12)  # the paired images only, extra.png left out
    assert glcm["ci95"][1] < 0 and glcm["significant"] is True
    ratio = pair(comparison, "base", "blurred", "compression_ratio")
    assert ratio["difference"] == pytest.approx(
        compression_ratio([folders["blurred"] / p.name for p in paths]) - compression_ratio(paths), rel=1e-12)
    assert ratio["ci95"][0] > 0 and ratio["significant"] is True


def test_outputs_have_the_documented_shape_and_agree(result, capsys):
    out, comparison = result
    saved = json.loads((out / "comparison.json").read_text())
    assert saved == comparison and set(saved) == {"folders", "pairs"}
    assert all(set(v) == {"value", "ci95"} for metrics in saved["folders"].values() for v in metrics.values())
    assert all(set(p) == {"a", "b", "metric", "difference", "ci95", "n_pairs", "significant"} for p in saved["pairs"])
    assert {(p["a"], p["b"]) for p in saved["pairs"]} == {("base", "copy"), ("base", "blurred"), ("copy", "blurred")}
    with open(out / "comparison.csv") as handle:
        rows = list(csv.DictReader(handle))
    pairs = [r for r in rows if r["kind"] == "pair"]
    assert len(pairs) == len(saved["pairs"])
    for row, p in zip(pairs, saved["pairs"]):
        assert (row["a"], row["b"], row["metric"]) == (p["a"], p["b"], p["metric"])
        assert float(row["value"]) == p["difference"] and float(row["ci95_low"]) == p["ci95"][0]
    assert json.loads((out / "unpaired.json").read_text()) == {"base": [], "copy": [], "blurred": ["extra.png"]}


def test_the_table_goes_to_the_terminal(folders, tmp_path, capsys):
    run(folders, tmp_path, "base", "blurred")
    printed = capsys.readouterr().out
    assert "glcm_score" in printed and "compression_ratio" in printed and " *" in printed
    assert "blurred: 1 image(s) without a match" in printed


def test_eval_py_results_are_used_when_the_folder_has_them(folders, tmp_path, monkeypatch):
    monkeypatch.setattr(os, "devnull", str(tmp_path / "null"))  # where a write "to nowhere" would land
    source = folders["copy"]
    fake = tmp_path / "copy"
    fake.mkdir()
    for path in source.glob("*.png"):
        fake.joinpath(path.name).write_bytes(path.read_bytes())
    with open(tmp_path / "copy_eval.csv", "w", newline="") as handle:  # eval.py's default CSV beside the folder
        writer = csv.writer(handle)
        writer.writerow(["file", "width", "height", "n_patches", "glcm", "raw_bytes", "compressed_bytes",
                         "compression_ratio"])
        for i, path in enumerate(sorted(fake.glob("*.png"))):
            writer.writerow([path.name, 128, 128, 4, 0.5 + 0.01 * i, 1000, 100, 10.0])
    comparison = compare.main(compare.parse_args(["--folders", str(folders["base"]), str(fake), "--out",
                                                  str(tmp_path / "out"), "--workers", "1", "--no_report"]))
    assert comparison["folders"]["copy"]["glcm_score"]["value"] == pytest.approx(0.5 + 0.01 * (N - 1) / 2)
    assert comparison["folders"]["copy"]["compression_ratio"]["value"] == pytest.approx(10.0)
    assert [p.name for p in (tmp_path / "out" / "measured").iterdir()] == ["0.csv"]  # base only: measured here
    assert not (tmp_path / "null").exists()  # nothing written over the null device on the way
    compare.main(compare.parse_args(["--folders", str(fake), str(fake), "--labels", "a", "b", "--out",
                                     str(tmp_path / "both"), "--workers", "1", "--no_report"]))
    assert not (tmp_path / "both" / "measured").exists()  # nothing measured here: no empty folder


def test_fid_and_patch_fid_come_from_the_saved_features(folders, tmp_path):
    rng = np.random.default_rng(0)
    real, patch_real = rng.normal(size=(N, 6)), rng.normal(size=(3 * N, 6))
    gens = {"base": (rng.normal(size=(N, 6)), rng.normal(size=(3 * N, 6))),
            "blurred": (rng.normal(size=(N, 6)) * 1.5 + 1, rng.normal(size=(3 * N, 6)) * 2)}
    copies = {}
    for name, (gen, patch_gen) in gens.items():
        folder = tmp_path / name
        folder.mkdir()
        for path in folders["base"].glob("*.png"):
            folder.joinpath(path.name).write_bytes(path.read_bytes())
        save_features(folder / "features.npz", files=np.array(sorted(p.name for p in folder.glob("*.png"))),
                      inception_real=real, inception_generated=gen, patch_real=patch_real, patch_generated=patch_gen)
        copies[name] = folder
    comparison = run(copies, tmp_path / "out", "base", "blurred")
    for name, (gen, patch_gen) in gens.items():
        assert comparison["folders"][name]["fid"]["value"] == pytest.approx(direct_fid(real, gen), rel=1e-6)
        assert comparison["folders"][name]["patch_fid"]["value"] == pytest.approx(direct_fid(patch_real, patch_gen),
                                                                                  rel=1e-6)
    groups = np.repeat(np.arange(N), 3)  # an image's three crops are resampled together (fid_ci: test_bootstrap.py)
    gen, patch_gen = gens["base"]
    assert comparison["folders"]["base"]["patch_fid"]["ci95"] == pytest.approx(
        fid_ci(patch_real, patch_gen, 400, 0, real_groups=groups, gen_groups=groups)[1], rel=1e-9)
    fid = pair(comparison, "base", "blurred", "fid")
    assert fid["difference"] == pytest.approx(direct_fid(real, gens["blurred"][0]) - direct_fid(real, gens["base"][0]),
                                              rel=1e-6)
    assert fid["ci95"][0] < fid["difference"] < fid["ci95"][1] and fid["significant"] == (fid["ci95"][0] > 0)


def test_usage_errors(folders, tmp_path):
    with pytest.raises(UsageError, match="at least two folders"):
        run(folders, tmp_path, "base")
    with pytest.raises(UsageError, match="one distinct label per folder"):
        run(folders, tmp_path, "base", "copy", extra=("--labels", "x"))
    with pytest.raises(UsageError, match="not a folder"):
        compare.main(compare.parse_args(["--folders", str(folders["base"]), str(tmp_path / "nope"), "--out",
                                         str(tmp_path / "o")]))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match="holds no images"):
        compare.main(compare.parse_args(["--folders", str(folders["base"]), str(empty), "--out", str(tmp_path / "o")]))
    other = tmp_path / "other"
    other.mkdir()
    Image.new("RGB", (64, 64)).save(other / "unrelated.png")
    with pytest.raises(UsageError, match="no image file name is in every folder"):
        compare.main(compare.parse_args(["--folders", str(folders["base"]), str(other), "--out", str(tmp_path / "o"),
                                         "--workers", "1"]))


def test_the_report_says_when_an_image_is_smaller_than_the_crop_and_how_large_a_difference_is(folders, tmp_path):
    argv = ["--folders", str(folders["base"]), str(folders["blurred"]), "--out", str(tmp_path / "big"),
            "--bootstrap", "50", "--workers", "1", "--crop_size", "200"]
    comparison = compare.main(compare.parse_args(argv))
    page = (tmp_path / "big" / "report.html").read_text()
    assert page.count("the image is smaller than the 200² crop: both crops show all of it") == 2 * N  # 128² images
    compare.main(compare.parse_args([*argv[:4], str(tmp_path / "fits"), *argv[5:-1], "128"]))
    assert "smaller than" not in (tmp_path / "fits" / "report.html").read_text()  # 128² images, 128² crops
    glcm = pair(comparison, "base", "blurred", "glcm_score")
    relative = 100 * glcm["difference"] / comparison["folders"]["base"]["glcm_score"]["value"]
    assert f"<td>{relative:+.3g} %</td>" in page and "not that it is large enough to matter" in page
