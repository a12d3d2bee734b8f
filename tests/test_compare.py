"""compare.py: folder values equal the metrics computed directly and add up to the differences, identical folders
differ by exactly zero, a blurred copy loses GLCM significantly, FID-family numbers come from the saved features and
are paired when the folders hold the same prompts, every difference has its p-value and Holm's mark, and nothing is
dropped or mixed silently (stale CSVs, other settings, features of other images)."""
import csv
import json
import os
import shutil

import numpy as np
import pytest
import scipy.linalg
from PIL import Image, ImageFilter
from skimage import data

import compare
import eval as eval_py
from bootstrap import fid_ci, fid_difference, percentile_interval
from detail_metrics import compression_ratio, glcm_score
from errors import UsageError, exit_on_usage_error
from patch_fid import save_features
from test_bootstrap import direct_kid

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
        assert entry["ci95"][0] < entry["value"] < entry["ci95"][1] and entry["n"] == N and "all_images" not in entry


def test_folder_values_and_differences_use_the_same_images(folders, result):
    """blurred/ holds one image more: its values use the paired images (those of every folder), and add up to the
    difference; its values over every image it holds go under all_images."""
    _, comparison = result
    base, blurred = comparison["folders"]["base"], comparison["folders"]["blurred"]
    for metric in ("glcm_score", "compression_ratio"):
        difference = pair(comparison, "base", "blurred", metric)["difference"]
        assert blurred[metric]["value"] - base[metric]["value"] == pytest.approx(difference, rel=1e-12)
        assert blurred[metric]["n"] == N and blurred[metric]["all_images"]["n"] == N + 1
    everything = sorted(folders["blurred"].glob("*.png"))
    assert blurred["glcm_score"]["all_images"]["value"] == pytest.approx(np.mean([glcm_score(p) for p in everything]),
                                                                         rel=1e-12)
    assert blurred["compression_ratio"]["all_images"]["value"] == pytest.approx(compression_ratio(everything),
                                                                                rel=1e-12)


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
    assert saved == comparison and set(saved) == {"folders", "pairs", "tests"}
    assert all(set(v) - {"all_images"} == {"value", "ci95", "n"} for metrics in saved["folders"].values()
               for v in metrics.values())
    assert all(set(p) == {"a", "b", "metric", "difference", "ci95", "n_pairs", "significant", "paired", "p_value",
                          "significant_holm"} for p in saved["pairs"])
    assert saved["tests"] == {"m": 6, "alpha": 0.05, "bootstrap": 400, "holm_min_bootstrap": 119}
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
    assert "glcm_score" in printed and "compression_ratio" in printed and " * H" in printed
    assert "blurred: 1 image(s) without a match" in printed
    assert "2 tests were made" in printed and "Holm" in printed


def written_out_p(a, b, n_resamples, seed):
    """The paired bootstrap of a mean difference written out (index draws from the same generator), and its
    two-sided p: (2 · min(#{δ* ≤ 0}, #{δ* ≥ 0}) + 1) / (B + 1)."""
    d = np.asarray(b) - np.asarray(a)
    draws = np.random.default_rng(seed).integers(0, len(d), size=(n_resamples, len(d)))
    replicates = d[draws].mean(axis=1)
    return min(1.0, (2 * min((replicates <= 0).sum(), (replicates >= 0).sum()) + 1) / (n_resamples + 1))


def test_every_difference_has_its_p_value_and_holms_mark(folders, result):
    _, comparison = result
    names = sorted(p.name for p in folders["base"].glob("*.png"))
    for a, b in (("base", "blurred"), ("base", "copy")):
        got = pair(comparison, a, b, "glcm_score")["p_value"]
        assert got == pytest.approx(written_out_p([glcm_score(folders[a] / n) for n in names],
                                                  [glcm_score(folders[b] / n) for n in names], 400, 0), rel=1e-12)
    p = [row["p_value"] for row in comparison["pairs"]]  # Holm over all 6 tests, written out as adjusted p-values
    order = np.argsort(p)
    adjusted = np.maximum.accumulate([(len(p) - rank) * p[i] for rank, i in enumerate(order)])
    expected = {int(i): bool(adjusted[rank] <= 0.05) for rank, i in enumerate(order)}
    assert [row["significant_holm"] for row in comparison["pairs"]] == [expected[i] for i in range(len(p))]
    assert pair(comparison, "base", "blurred", "glcm_score")["significant_holm"] is True
    assert pair(comparison, "base", "copy", "glcm_score")["significant_holm"] is False


def test_holm_with_too_few_resamples_rejects_nothing_and_says_so(folders, tmp_path, capsys):
    """4 folders, 6 pairs × 2 metrics: 12 tests need a p-value of 0.05/12, so B ≥ 239; at 200 none survives Holm."""
    four = run(folders, tmp_path, "base", "copy", "blurred", "base",
               extra=("--bootstrap", "200", "--labels", "a", "b", "c", "d"))
    assert four["tests"]["m"] == 12 and four["tests"]["holm_min_bootstrap"] == 239
    assert any(p["significant"] for p in four["pairs"]) and not any(p["significant_holm"] for p in four["pairs"])
    assert "Holm cannot reject any of 12 tests: use --bootstrap 239 or more" in capsys.readouterr().out


def test_eval_py_results_are_used_when_the_folder_has_them(folders, tmp_path, monkeypatch):
    monkeypatch.setattr(os, "devnull", str(tmp_path / "null"))  # where a write "to nowhere" would land
    source = folders["copy"]
    fake = tmp_path / "copy"
    fake.mkdir()
    for path in source.glob("*.png"):
        fake.joinpath(path.name).write_bytes(path.read_bytes())
    (tmp_path / "copy_eval.json").write_text(json.dumps({"prop": "entropy", "patch_size": 64, "cr_mode": "encode",
                                                         "jpeg_quality": 95}))  # eval.py's summary: its settings
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
        assert comparison["folders"][name]["kid"]["value"] == pytest.approx(direct_kid(real, gen), rel=1e-9)
        assert comparison["folders"][name]["patch_kid"]["value"] == pytest.approx(direct_kid(patch_real, patch_gen),
                                                                                  rel=1e-9)
    groups = np.repeat(np.arange(N), 3)  # an image's three crops are resampled with it, with its real crops
    gen, patch_gen = gens["base"]
    assert comparison["folders"]["base"]["patch_fid"]["ci95"] == pytest.approx(
        fid_ci(patch_real, patch_gen, 400, 0, real_groups=groups, gen_groups=groups, aligned=True)[1], rel=1e-9)
    fid = pair(comparison, "base", "blurred", "fid")
    assert fid["difference"] == pytest.approx(direct_fid(real, gens["blurred"][0]) - direct_fid(real, gens["base"][0]),
                                              rel=1e-6)
    assert fid["ci95"] == pytest.approx(fid_difference(real, gen, real, gens["blurred"][0], 400, 0, paired=True,
                                                       aligned=(True, True))[1], rel=1e-9)
    assert fid["paired"] is True and fid["n_pairs"] == N
    assert fid["significant"] == (fid["ci95"][0] > 0)
    kid = pair(comparison, "base", "blurred", "kid")
    assert kid["difference"] == pytest.approx(direct_kid(real, gens["blurred"][0]) - direct_kid(real, gen), rel=1e-9)
    entry = comparison["folders"]["base"]["fid_inf"]
    assert entry["n"] == N and entry["seed"] == 0 and entry["sizes"][-1] == N and entry["ci95"][0] < entry["ci95"][1]
    assert "patch_fid_inf" not in comparison["folders"]["base"]


def copy_folder(source, target, names=None):
    """A copy of the images of `source` (or of those named) in a new folder `target`."""
    target.mkdir(parents=True)
    for path in sorted(source.glob("*.png")):
        if names is None or path.name in names:
            shutil.copy(path, target / path.name)
    return target


def test_fid_pairs_follow_the_prompts_in_any_row_order_and_fall_back_to_unpaired(folders, tmp_path):
    rng = np.random.default_rng(1)
    real = rng.normal(size=(N + 1, 6))
    gens = {"a": rng.normal(size=(N + 1, 6)), "b": rng.normal(size=(N + 1, 6)) * 1.4 + 0.5}
    names = sorted(p.name for p in folders["blurred"].glob("*.png"))  # the 12 paired names and extra.png
    paths, order = {}, rng.permutation(N)
    for name, gen in gens.items():  # a: rows in file order; b: the same prompts, rows shuffled
        rows = np.arange(N) if name == "a" else order
        paths[name] = copy_folder(folders["base"], tmp_path / name)
        save_features(paths[name] / "features.npz", files=np.array(names[:N])[rows], inception_real=real[rows],
                      inception_generated=gen[rows])
    paths["c"] = copy_folder(folders["blurred"], tmp_path / "c")  # one prompt more: not the same prompts
    save_features(paths["c"] / "features.npz", files=np.array(names), inception_real=real,
                  inception_generated=gens["b"])
    comparison = run(paths, tmp_path / "out", "a", "b", "c")
    ab, ac = pair(comparison, "a", "b", "fid"), pair(comparison, "a", "c", "fid")
    assert ab["paired"] is True and ab["n_pairs"] == N
    assert ab["ci95"] == pytest.approx(fid_difference(real[:N], gens["a"][:N], real[:N], gens["b"][:N], 400, 0,
                                                      paired=True, aligned=(True, True))[1], rel=1e-9)
    assert ac["paired"] is False and ac["n_pairs"] == 0
    assert ac["ci95"] == pytest.approx(fid_difference(real[:N], gens["a"][:N], real, gens["b"], 400, 0,
                                                      aligned=(True, True))[1], rel=1e-9)
    assert ab["ci95"][1] - ab["ci95"][0] < ac["ci95"][1] - ac["ci95"][0]
    assert comparison["folders"]["c"]["fid"]["n"] == N + 1  # FID over the features' images, as its difference
    assert pair(comparison, "a", "c", "kid")["paired"] is False


def test_features_of_other_images_are_refused_before_anything_is_measured(folders, tmp_path, capsys):
    stale = copy_folder(folders["base"], tmp_path / "stale")
    rng = np.random.default_rng(0)
    names = sorted(p.name for p in stale.glob("*.png"))[:-1]  # one image added after the features were saved
    save_features(stale / "features.npz", files=np.array(names), inception_real=rng.normal(size=(N - 1, 4)),
                  inception_generated=rng.normal(size=(N - 1, 4)))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        exit_on_usage_error("compare.py", run, {"base": folders["base"], "stale": stale}, out, "base", "stale")
    assert stop.value.code == 2
    message = capsys.readouterr().err.strip()
    assert "\n" not in message and str(stale) in message and "00011.png" in message
    assert not list(out.glob("measured/*.csv"))  # refused before the first image was measured


def test_a_stale_eval_csv_is_completed_by_measuring_the_images_it_lacks(folders, tmp_path, capsys):
    x, y = copy_folder(folders["base"], tmp_path / "x"), copy_folder(folders["blurred"], tmp_path / "y")
    eval_py.main(eval_py.parse_args(["--img_root", str(y), "--workers", "1", "--bootstrap", "0"]))
    new = Image.fromarray(data.camera()).convert("RGB").crop((0, 0, 96, 96))
    new.save(x / "new.png")
    new.filter(ImageFilter.GaussianBlur(1.5)).save(y / "new.png")  # added after eval.py ran
    capsys.readouterr()
    comparison = run({"x": x, "y": y}, tmp_path / "out", "x", "y")
    paths = sorted(y.glob("*.png"))  # the 12 paired images, extra.png and new.png
    paired = [p for p in paths if p.name != "extra.png"]
    assert comparison["folders"]["y"]["glcm_score"]["value"] == pytest.approx(np.mean([glcm_score(p) for p in paired]),
                                                                              rel=1e-12)
    assert comparison["folders"]["y"]["glcm_score"]["n"] == N + 1
    assert {p["metric"] for p in comparison["pairs"]} == {"glcm_score", "compression_ratio"}
    assert pair(comparison, "x", "y", "compression_ratio")["n_pairs"] == N + 1
    printed = capsys.readouterr().out
    assert f"{y}_eval.csv lacks 1 of the folder's images (e.g. new.png): measured here with its settings" in printed


def test_folders_measured_with_other_settings_are_refused(folders, tmp_path, capsys):
    x, y = copy_folder(folders["base"], tmp_path / "x"), copy_folder(folders["blurred"], tmp_path / "y")
    eval_py.main(eval_py.parse_args(["--img_root", str(x), "--workers", "1", "--bootstrap", "0", "--prop",
                                     "contrast"]))
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:  # y is measured here, with the defaults: another GLCM
        exit_on_usage_error("compare.py", run, {"x": x, "y": y}, tmp_path / "out", "x", "y")
    message = capsys.readouterr().err
    assert stop.value.code == 2 and "different prop" in message and f"{x}: contrast" in message
    assert f"{y}: entropy" in message and not (tmp_path / "out" / "comparison.json").exists()
    # A --protocol authors folder (GLCM and CR of its q95 JPEG copies) against a folder of lossless images:
    authors = copy_folder(folders["base"], tmp_path / "authors")
    for path in sorted(authors.glob("*.png")):
        Image.open(path).save(path.with_suffix(".jpg"), quality=95)
    with open(authors / "per_image.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "prompt", "glcm_score", "compression_ratio", "raw_bytes"])
        writer.writerows([p.name, "a prompt", 0.5, 10.0, 49152] for p in sorted(authors.glob("*.png")))
    (authors / "metrics.json").write_text(json.dumps({"settings": {"protocol": "authors"}}))
    with pytest.raises(UsageError, match="different cr_mode"):
        run({"y": y, "authors": authors}, tmp_path / "out2", "y", "authors")
    alone = compare.load_run(authors, "authors")
    assert sorted(alone["images"]) == sorted(p.name for p in authors.glob("*.png"))  # the JPEG copies are not images


def test_clip_score_an_image_lacks_is_refused_rather_than_dropped(folders, tmp_path):
    scored = copy_folder(folders["base"], tmp_path / "scored")
    with open(scored / "per_image.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "prompt", "clip_score", "aesthetics"])
        writer.writerows([p.name, "a prompt", 30.0, 5.0] for p in sorted(scored.glob("*.png"))[:-1])
    (scored / "metrics.json").write_text(json.dumps({"settings": {"protocol": "paper"}}))
    with pytest.raises(UsageError, match="no clip_score for 1 of the folder's images \\(e.g. 00011.png\\)"):
        run({"base": folders["base"], "scored": scored}, tmp_path / "out", "base", "scored")


def test_n_pairs_counts_the_pairs_a_row_used(folders, tmp_path):
    x, y = (copy_folder(folders[name], tmp_path / label, {f"{i:05d}.png" for i in range(4)})
            for name, label in (("base", "x"), ("blurred", "y")))
    Image.open(y / "00003.png").resize((40, 40)).save(y / "00003.png")  # no 64² patch: its GLCM Score is NaN
    comparison = run({"x": x, "y": y}, tmp_path / "out", "x", "y", extra=("--bootstrap", "0"))
    assert pair(comparison, "x", "y", "glcm_score")["n_pairs"] == 3
    assert pair(comparison, "x", "y", "compression_ratio")["n_pairs"] == 4
    assert comparison["folders"]["y"]["glcm_score"]["n"] == 3 and comparison["folders"]["x"]["glcm_score"]["n"] == 4


def test_bootstrap_is_0_or_at_least_200(folders, tmp_path, capsys):
    for bad in ("1", "199", "-1"):
        with pytest.raises(UsageError, match=f"--bootstrap {bad}: give 0 \\(no intervals\\) or at least 200"):
            run(folders, tmp_path, "base", "copy", extra=("--bootstrap", bad))
    comparison = run(folders, tmp_path, "base", "blurred", extra=("--bootstrap", "0"))
    assert all(p["ci95"] == [None, None] and p["p_value"] is None and not p["significant"]
               and not p["significant_holm"] for p in comparison["pairs"])
    assert comparison["tests"]["m"] == 0 and "No differences were tested" in capsys.readouterr().out


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
            "--bootstrap", "200", "--workers", "1", "--crop_size", "200"]
    comparison = compare.main(compare.parse_args(argv))
    page = (tmp_path / "big" / "report.html").read_text()
    assert page.count("the image is smaller than the 200² crop: both crops show all of it") == 2 * N  # 128² images
    compare.main(compare.parse_args([*argv[:4], str(tmp_path / "fits"), *argv[5:-1], "128"]))
    assert "smaller than" not in (tmp_path / "fits" / "report.html").read_text()  # 128² images, 128² crops
    glcm = pair(comparison, "base", "blurred", "glcm_score")
    relative = 100 * glcm["difference"] / comparison["folders"]["base"]["glcm_score"]["value"]
    assert f"<td>{relative:+.3g} %</td>" in page and "not that it is large enough to matter" in page
