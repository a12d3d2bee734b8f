"""eval.py / detail_metrics.py: GLCM Score and Compression Ratio equal the authors' reference (PROTOCOL.md §6)."""
import argparse
import io
import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data
from skimage.feature import graycomatrix, graycoprops
from skimage.measure import shannon_entropy

import detail_metrics as dm
import eval as eval_cli
from errors import exit_on_usage_error

PROPS = ("entropy", "contrast", "dissimilarity", "homogeneity", "energy", "correlation", "ASM")
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
SIZES = ((192, 256), (130, 200))  # (height, width): non-square, with a remainder to drop


# ------------------------------------------------------------------ reference: the authors' eval.py, written out


def reference_grey64(rgb):
    """OpenCV's COLOR_BGR2GRAY on uint8 (15-bit fixed point, round half up), then 64 levels.

    OpenCV 4.10.0.84 (the authors' pin), 4.14 and 5.0 all give exactly this on the 2^24 colours; the
    14-bit form often quoted, (1868·B + 9617·G + 4899·R + 8192) >> 14, differs on 43,864 of them.
    """
    r, g, b = (rgb[..., k].astype(np.int64) for k in range(3))
    y = np.right_shift(3735 * b + 19235 * g + 9798 * r + (1 << 14), 15)
    return (y // 4).astype(np.uint8)


def reference_patch_scores(rgb, prop, patch_size=64):
    """The authors' loop: skimage per patch, row-major from the top-left, remainder dropped."""
    grey = reference_grey64(rgb)
    scores = []
    for i in range(grey.shape[0] // patch_size):
        for j in range(grey.shape[1] // patch_size):
            patch = grey[i * patch_size:(i + 1) * patch_size, j * patch_size:(j + 1) * patch_size]
            glcm = graycomatrix(patch, [1, 2, 3, 4], [0, np.pi / 4, np.pi / 2, np.pi * 3 / 4], levels=64, normed=True)
            scores.append(shannon_entropy(glcm) if prop == "entropy" else np.mean(graycoprops(glcm, prop).round(4)))
    return np.array(scores)


def photo(name, size=None):
    """A scikit-image photograph, optionally resized to (height, width)."""
    img = getattr(data, name)()
    return img if size is None else np.asarray(Image.fromarray(img).resize(size[::-1], Image.BICUBIC))


def synthetic():
    """Hard cases side by side: flat, two-level stripes, a ramp, uniform noise, sparse noise (192×320)."""
    rng = np.random.default_rng(0)
    grey = np.zeros((192, 320), np.uint8)
    grey[:, :64] = 200                                             # one value everywhere: 1.0 in every offset
    grey[:, 64:128] = np.where(np.arange(64) % 2, 40, 41 * 4)      # two levels
    grey[:, 128:192] = np.arange(64, dtype=np.uint8)[None, :] * 4  # a ramp
    grey[:, 192:256] = rng.integers(0, 256, (192, 64))             # noise over all levels
    grey[:, 256:] = np.where(rng.random((192, 64)) < 0.02, 255, 7)  # mostly flat
    return np.repeat(grey[:, :, None], 3, axis=2)


# ------------------------------------------------------------------ grey conversion


def test_grey64_equals_opencv_formula():
    rng = np.random.default_rng(0)
    levels = np.array([0, 1, 2, 3, 4, 127, 128, 251, 252, 253, 254, 255], np.uint8)
    corners = np.stack(np.meshgrid(levels, levels, levels), axis=-1).reshape(-1, 3)
    rgb = np.concatenate([corners, rng.integers(0, 256, (1 << 20, 3))]).astype(np.uint8)[:, None, :]
    assert np.array_equal(dm.grey64(rgb).numpy(), reference_grey64(rgb))
    for name in PHOTOS:
        assert np.array_equal(dm.grey64(photo(name)).numpy(), reference_grey64(photo(name)))


def test_grey64_equals_opencv_itself():
    cv2 = pytest.importorskip("cv2")
    colours = np.arange(1 << 24, dtype=np.uint32)[::7]
    rgb = np.stack([colours >> 16, (colours >> 8) & 255, colours & 255], axis=-1).astype(np.uint8)[:, None, :]
    for image in [rgb] + [photo(name) for name in PHOTOS]:
        expected = cv2.cvtColor(np.ascontiguousarray(image[..., ::-1]), cv2.COLOR_BGR2GRAY) // 4
        assert np.array_equal(dm.grey64(image).numpy(), expected)


# ------------------------------------------------------------------ GLCM


def test_glcm_counts_equal_graycomatrix():
    grey = reference_grey64(np.concatenate([photo("astronaut", (64, 256)), synthetic()[:64]], axis=1))
    patches = torch.from_numpy(grey).reshape(64, -1, 64).permute(1, 0, 2)
    counts, lo, r = dm.glcm_counts(patches)
    for k in range(patches.shape[0]):
        full = np.zeros((16, 128, 128), np.int64)  # the batch keeps R levels from each patch's lowest
        full[:, lo[k]:lo[k] + r, lo[k]:lo[k] + r] = counts[:, :, k].reshape(16, r, r).numpy()
        assert not full[:, 64:].any() and not full[:, :, 64:].any()
        full = full[:, :64, :64]
        ref = graycomatrix(patches[k].numpy(), [1, 2, 3, 4], [0, np.pi / 4, np.pi / 2, np.pi * 3 / 4], levels=64)
        assert np.array_equal(full, ref.transpose(2, 3, 0, 1).reshape(16, 64, 64))


@pytest.mark.parametrize("prop", PROPS)
def test_glcm_score_equals_reference_loop(prop):
    images = [photo(name, size) for name in PHOTOS for size in SIZES] + [synthetic()]
    for rgb in images:
        expected = reference_patch_scores(rgb, prop)
        np.testing.assert_allclose(dm.glcm_patch_scores(dm.grey64(rgb), prop), expected, rtol=0, atol=1e-12)
        assert abs(dm.glcm_score(rgb, prop) - expected.mean()) < 1e-12


def test_contrast_rounding_ties_are_exercised():
    """graycoprops rounds to 4 decimals; a contrast of exactly k.5e-4 (e.g. 24/3840) rounds either way with
    the last bit, so only skimage's summation order gives its answer. The photos above contain such ties."""
    ties = 0
    for name in PHOTOS:
        for size in SIZES:
            grey = reference_grey64(photo(name, size))
            for i in range(grey.shape[0] // 64):
                for j in range(grey.shape[1] // 64):
                    glcm = graycomatrix(grey[i * 64:(i + 1) * 64, j * 64:(j + 1) * 64], [1, 2, 3, 4],
                                        [0, np.pi / 4, np.pi / 2, np.pi * 3 / 4], levels=64).astype(np.int64)
                    sq = ((np.arange(64)[:, None] - np.arange(64)[None, :]) ** 2)[:, :, None, None]
                    num, den = 20000 * (glcm * sq).sum(axis=(0, 1)), glcm.sum(axis=(0, 1))
                    ties += int(((num % den == 0) & ((num // den) % 2 == 1)).sum())  # 1e4·K/N = k + 1/2
    assert ties > 0


@pytest.mark.parametrize("patch_size", [3, 5, 16, 100])
def test_other_patch_sizes_equal_reference(patch_size):
    """Offsets longer than the patch have no pairs (skimage divides by 1); totals change with the size."""
    side = 6 * patch_size if patch_size < 16 else 192  # a few dozen patches
    rgb = np.concatenate([photo("coffee", (side, side)), synthetic()[:side, :side]], axis=1)
    for prop in ("entropy", "contrast", "correlation"):
        expected = reference_patch_scores(rgb, prop, patch_size)
        np.testing.assert_allclose(dm.glcm_patch_scores(dm.grey64(rgb), prop, patch_size), expected, rtol=0, atol=1e-12)


def test_equal_values_from_different_offsets_share_one_histogram_bin():
    """64/4032 == 63/3969 == 1/63: cells of offsets with different pair totals can hold the same value."""
    counts = torch.zeros(16, 4096, 1, dtype=torch.int32)
    totals = [n for _, _, n in dm.glcm_offsets(64)]
    o_a, o_b = totals.index(4032), totals.index(3969)
    counts[o_a, :3] = 64
    counts[o_b, 10:13] = 63
    counts[o_b, 20] = 2
    values = (counts[..., 0].double() / torch.tensor(totals, dtype=torch.float64)[:, None]).numpy()
    expected = shannon_entropy(values)
    assert abs(dm._entropy_scores(counts, 64, 64).item() - expected) < 1e-12


def test_batching_and_gpu_summation_order_change_nothing():
    grey = dm.grey64(np.concatenate([photo("rocket", (192, 256)), synthetic()[:192]], axis=1))
    for prop in ("entropy", "correlation"):
        scores = [dm.glcm_patch_scores(grey, prop, chunk=chunk) for chunk in (1, 5, 16, 1000)]
        for s in scores[1:]:  # entropy: the float sum over histogram bins may differ in the last bits
            np.testing.assert_allclose(s, scores[0], rtol=0, atol=1e-13 if prop == "entropy" else 0)
    patches = grey[:64].reshape(64, -1, 64).permute(1, 0, 2)
    counts, lo, r = dm.glcm_counts(patches)
    for prop in ("contrast", "homogeneity", "energy", "correlation"):  # the loop is what runs on the GPU
        looped = dm.prop_values(counts, lo, r, prop, loop=True)
        assert torch.equal(looped, dm.prop_values(counts, lo, r, prop, loop=False))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_cuda_equals_cpu():
    grey = dm.grey64(photo("astronaut"))
    for prop in ("entropy", "contrast"):
        cpu = dm.glcm_patch_scores(grey, prop)
        np.testing.assert_allclose(dm.glcm_patch_scores(grey.cuda(), prop), cpu, rtol=0, atol=1e-12)


def test_images_without_a_full_patch_score_nan():
    assert np.isnan(dm.glcm_score(np.zeros((1, 1, 3), np.uint8)))
    assert np.isnan(dm.glcm_score(photo("chelsea")[:63, :500]))


# ------------------------------------------------------------------ reading images


def write_png16(path, arr):
    """A 16-bit grey (H×W) or RGB (H×W×3) PNG, written by hand: Pillow cannot write 16-bit RGB."""
    h, w = arr.shape[:2]
    rows = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", w, h, 16, 0 if arr.ndim == 2 else 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


@pytest.fixture
def formats(tmp_path):
    """{file: the 8-bit RGB OpenCV's imread(IMREAD_COLOR) gives} for the input kinds eval.py supports."""
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, (20, 30, 4), dtype=np.uint8)
    g16 = rng.integers(0, 65536, (20, 30), dtype=np.uint16)
    rgb16 = rng.integers(0, 65536, (20, 30, 3), dtype=np.uint16)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    out = {}
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    out["rgba.png"] = rgba[..., :3]                                   # alpha dropped, not composited
    Image.fromarray(rgba[..., :2].copy(), "LA").save(tmp_path / "la.png")
    out["la.png"] = np.repeat(rgba[..., :1], 3, axis=2)
    Image.fromarray(rgb[..., 0]).save(tmp_path / "grey.png")
    out["grey.png"] = np.repeat(rgb[..., :1], 3, axis=2)
    write_png16(tmp_path / "g16.png", g16)
    out["g16.png"] = np.repeat((g16 >> 8).astype(np.uint8)[..., None], 3, axis=2)  # high byte
    write_png16(tmp_path / "rgb16.png", rgb16)
    out["rgb16.png"] = (rgb16 >> 8).astype(np.uint8)
    pal = Image.fromarray(rgb).quantize(16)
    pal.save(tmp_path / "palette.png", transparency=3)
    out["palette.png"] = np.asarray(pal.convert("RGB"))               # palette colours, transparency ignored
    Image.fromarray(rgb).save(tmp_path / "lossless.webp", lossless=True)
    out["lossless.webp"] = rgb
    exif = Image.Exif()
    exif[0x0112] = 6                                                  # "rotate 90° clockwise to display"
    Image.fromarray(rgb).save(tmp_path / "rotated.webp", lossless=True, exif=exif)
    out["rotated.webp"] = np.rot90(rgb, k=-1)
    return {tmp_path / name: expected for name, expected in out.items()}


def test_every_format_reads_as_opencv_does(formats):
    for path, expected in formats.items():
        assert np.array_equal(dm.to_rgb8(path), expected), path.name
        assert np.array_equal(dm.to_rgb8(Image.open(path)), expected), path.name


def test_reading_equals_opencv_itself(formats):
    cv2 = pytest.importorskip("cv2")
    for path in formats:
        if path.suffix == ".webp" and "rotated" in path.name:
            continue  # OpenCV applies EXIF orientation to JPEG only
        assert np.array_equal(dm.to_rgb8(path), cv2.imread(str(path), cv2.IMREAD_COLOR)[..., ::-1]), path.name


# ------------------------------------------------------------------ Compression Ratio


def test_compression_ratio_is_raw_over_pillow_jpeg_q95(tmp_path):
    images = [Image.fromarray(photo(name, size)) for name in PHOTOS for size in SIZES]
    raw = sum(im.width * im.height * 3 for im in images)
    jpeg = 0
    for im in images:
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=95)
        jpeg += len(buf.getvalue())
    assert dm.compression_ratio(images) == raw / jpeg
    paths = []
    for k, im in enumerate(images):
        paths.append(tmp_path / f"{k}.jpg")
        im.save(paths[-1], quality=80)
    assert dm.compression_ratio(paths, mode="file") == raw / sum(os.path.getsize(p) for p in paths)
    with pytest.raises(ValueError, match="paths"):
        dm.compression_ratio(images, mode="file")


# ------------------------------------------------------------------ folders and the command line


@pytest.fixture
def folder(tmp_path):
    """Three photos (one in a sub-folder), an image smaller than a patch, a 1×1 image, a truncated PNG, a text file."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    Image.fromarray(photo("astronaut", (192, 256))).save(root / "a.png")
    Image.fromarray(photo("coffee", (130, 200))).save(root / "b.jpg", quality=95)
    Image.fromarray(photo("rocket", (128, 192))).save(root / "sub" / "c.webp", lossless=True)
    Image.fromarray(photo("chelsea", (40, 50))).save(root / "small.png")
    Image.fromarray(np.full((1, 1, 3), 9, np.uint8)).save(root / "one.png")
    (root / "truncated.png").write_bytes((root / "a.png").read_bytes()[:3000])
    (root / "notes.txt").write_text("not an image")
    return root


def test_folder_skips_bad_files_and_scores_the_rest(folder):
    with pytest.warns(UserWarning) as caught:
        summary, rows = dm.evaluate_folder(folder, workers=1, progress=False)
    messages = " ".join(str(w.message) for w in caught)
    for name in ("truncated.png", "notes.txt", "small.png", "one.png"):
        assert name in messages
    assert summary["n_skipped"] == 2 and sorted(summary["skipped"]) == ["notes.txt", "truncated.png"]
    assert summary["n_images"] == 4 and summary["n_glcm_images"] == 2
    readable = [folder / n for n in ("a.png", "b.jpg", "one.png", "small.png")]
    assert summary["compression_ratio"] == dm.compression_ratio(readable)
    assert summary["glcm_score"] == pytest.approx(np.mean([dm.glcm_score(folder / n) for n in ("a.png", "b.jpg")]),
                                                  abs=1e-12)
    with pytest.warns(UserWarning):
        summary_rec, rows_rec = dm.evaluate_folder(folder, workers=1, recursive=True, progress=False)
    assert summary_rec["n_images"] == 5 and "sub/c.webp" in [r["file"] for r in rows_rec]


def test_empty_or_unreadable_folder_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no files"):
        dm.evaluate_folder(empty, workers=1, progress=False)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "x.png").write_text("nope")
    with pytest.raises(ValueError, match="could be read"), pytest.warns(UserWarning, match="x.png"):
        dm.evaluate_folder(junk, workers=1, progress=False)


def test_cli_writes_csv_and_json(folder, tmp_path, repo_root):
    out_json, out_csv = tmp_path / "summary.json", tmp_path / "rows.csv"
    cmd = [sys.executable, "eval.py", "--img_root", str(folder), "--workers", "2", "--size", "256",
           "--output_json", str(out_json), "--output_csv", str(out_csv)]
    done = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "GLCM Score" in done.stdout and "Compression Ratio" in done.stdout
    summary = json.loads(out_json.read_text())
    for key in ("glcm_score", "compression_ratio", "n_images", "n_skipped", "prop", "patch_size", "cr_mode", "size"):
        assert key in summary
    # Two worker processes give what one process gives.
    with pytest.warns(UserWarning):
        in_process, rows = dm.evaluate_folder(folder, workers=1, progress=False)
    assert summary["glcm_score"] == in_process["glcm_score"]
    assert summary["compression_ratio"] == in_process["compression_ratio"]
    lines = out_csv.read_text().splitlines()
    assert lines[0].split(",") == list(dm.CSV_FIELDS) and len(lines) == 1 + len(rows)


def test_cli_empty_folder_exits_with_a_message(tmp_path, capsys):
    args = argparse.Namespace(img_root=str(tmp_path), prop="entropy", patch_size=64, size=None, recursive=False,
                              cr_mode="encode", jpeg_quality=95, device="cpu", workers=1, output_csv=None,
                              output_json=None, bootstrap=0, bootstrap_seed=0)
    with pytest.raises(SystemExit) as exit_info:  # what `python eval.py` does: one line on stderr, status 2
        exit_on_usage_error("eval.py", eval_cli.main, args)
    assert exit_info.value.code == 2 and "eval.py: error: no files" in capsys.readouterr().err


def test_compiled_entropy_equals_reference_on_many_images():
    """The CPU kernel (counts per step, values merged as equal floats) against the authors' loop: noise, few
    levels, ramps, random walks and photos, several patch sizes, sizes with remainders, read-only inputs."""
    rng = np.random.default_rng(7)
    images = [photo("chelsea", (200, 260))]
    for k in range(24):
        h, w = (int(v) for v in rng.integers(64, 260, 2))
        kind = k % 4
        if kind == 0:
            rgb = rng.integers(0, 256, (h, w, 3))
        elif kind == 1:
            rgb = rng.integers(0, 3, (h, w, 3)) * int(rng.integers(1, 120))
        elif kind == 2:
            rgb = np.cumsum(rng.integers(-3, 4, (h, w, 3)), axis=1) % 256
        else:
            rgb = (np.arange(w)[None, :, None] * rng.uniform(0.05, 4) + np.arange(h)[:, None, None]) % 256
        images.append(np.broadcast_to(rgb, (h, w, 3)).astype(np.uint8))
    images[-1].flags.writeable = False
    for rgb in images:
        for patch_size in (64, 7, 100):
            expected = reference_patch_scores(rgb, "entropy", patch_size)
            ours = dm.glcm_patch_scores(dm.grey64(rgb), "entropy", patch_size)
            np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-12)
