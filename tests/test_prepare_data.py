"""prepare_data.py: verify / filter / make_eval_set on both layouts, bad input reported, input untouched, resumable."""
import hashlib
import io
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from scipy import ndimage
from skimage.feature import graycomatrix
from skimage.measure import shannon_entropy

import fid_metrics
import prepare_data
from errors import exit_on_usage_error
from imagefolder import read_metadata


def encode(array, fmt="PNG", exif_orientation=None):
    """Encoded bytes of a uint8 RGB array."""
    buf = io.BytesIO()
    image = Image.fromarray(array)
    if exif_orientation:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        image.save(buf, format=fmt, exif=exif, quality=95)
    else:
        image.save(buf, format=fmt)
    return buf.getvalue()


def pictures():
    """name -> encoded image: detailed noise, a flat field, a smooth ramp, a too-small one, a rotated JPEG."""
    rng = np.random.default_rng(0)
    ramp = np.broadcast_to(np.linspace(0, 255, 200, dtype=np.uint8)[None, :, None], (130, 200, 3)).copy()
    return {"noise.png": encode(rng.integers(0, 256, (160, 192, 3), dtype=np.uint8)),
            "flat.png": encode(np.full((128, 192, 3), 90, np.uint8)),
            "ramp.png": encode(ramp),
            "tiny.png": encode(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)),
            # stored 128 wide, 192 high; EXIF 6 (rotate 90° clockwise) shows it 192 wide, 128 high
            "rotated.jpg": encode(rng.integers(0, 256, (192, 128, 3), dtype=np.uint8), "JPEG", exif_orientation=6)}


GOOD = ("noise.png", "flat.png", "ramp.png", "rotated.jpg")


@pytest.fixture
def imagefolder(tmp_path):
    """An imagefolder with every kind of problem: truncated, not an image, a duplicate, a caption that is not text,
    an image no line names, a line whose image is missing, a line that is not JSON."""
    root = tmp_path / "folder"
    root.mkdir()
    lines = []
    for name, data in pictures().items():
        (root / name).write_bytes(data)
        lines.append({"file_name": name, "text": f"a photo: {name}"})
    (root / "copy_of_noise.png").write_bytes(pictures()["noise.png"])
    (root / "cut.png").write_bytes(pictures()["noise.png"][:300])
    (root / "not_an_image.jpg").write_bytes(b"hello")
    (root / "number.png").write_bytes(pictures()["ramp.png"][::1])
    (root / "unlisted.png").write_bytes(pictures()["flat.png"])
    lines += [{"file_name": "copy_of_noise.png", "text": "again"}, {"file_name": "cut.png", "text": "cut"},
              {"file_name": "not_an_image.jpg", "text": "text"}, {"file_name": "number.png", "text": 42},
              {"file_name": "gone.png", "text": "its file is missing"}]
    (root / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines) + "{oops\n")
    return root


def write_shard(path, rows, caption_type=pa.string(), row_group_size=2):
    """A Parquet shard in the Hub's layout: image struct {bytes, path} and text."""
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"image": pa.array([{"bytes": b, "path": n} for n, b, _ in rows], image_type),
                      "text": pa.array([t for _, _, t in rows], caption_type)})
    pq.write_table(table, path, row_group_size=row_group_size)


@pytest.fixture
def parquet_folder(tmp_path):
    """Three shards under data/: good rows (one truncated image, one without caption), a shard whose captions are
    integers, and a shard cut short."""
    root = tmp_path / "hub"
    (root / "data").mkdir(parents=True)
    p = pictures()
    write_shard(root / "data" / "train-00000-of-00003.parquet",
                [("noise.png", p["noise.png"], "noise"), ("flat.png", p["flat.png"], "flat"),
                 ("ramp.png", p["ramp.png"], None), ("cut.png", p["noise.png"][:300], "cut"),
                 ("rotated.jpg", p["rotated.jpg"], "rotated")])
    write_shard(root / "data" / "train-00001-of-00003.parquet", [("tiny.png", p["tiny.png"], 7)], pa.int64())
    write_shard(root / "data" / "train-00002-of-00003.parquet", [("noise2.png", p["noise.png"], "x")] * 4)
    cut = root / "data" / "train-00002-of-00003.parquet"
    cut.write_bytes(cut.read_bytes()[:-40])  # the footer is gone
    return root


def tree_digest(root):
    """sha256 over the relative names, bytes and mtimes of every file below root."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            digest.update(f"{path.relative_to(root)}{path.stat().st_mtime_ns}".encode() + path.read_bytes())
    return digest.hexdigest()


def run(argv):
    """prepare_data's main on a command line, as the script runs it."""
    return prepare_data.main(prepare_data.parse_args(argv))


# ------------------------------------------------------------------ verify


def test_verify_imagefolder_reports_each_problem_and_the_sizes(imagefolder, tmp_path):
    before = tree_digest(imagefolder)
    report = run(["verify", str(imagefolder), "--workers", "1", "--out_json", str(tmp_path / "v.json")])
    assert json.loads((tmp_path / "v.json").read_text()) == report
    assert report["n_images"] == 10 and report["n_readable"] == 8  # 9 listed files that exist + 1 unlisted
    assert sorted(c.split(":")[0] for c in report["corrupt"]) == ["cut.png", "not_an_image.jpg"]
    assert sorted(m.split(":")[0] for m in report["missing_caption"]) == ["number.png", "unlisted.png"]
    assert any("not text" in m for m in report["missing_caption"])
    assert report["orphan_captions"] == ["gone.png"]
    assert sorted(map(sorted, report["duplicates"])) == [["copy_of_noise.png", "noise.png"],
                                                          ["flat.png", "unlisted.png"], ["number.png", "ramp.png"]]
    assert report["short_side"]["min"] == 30 and report["short_side"]["max"] == 160
    assert any("line 11: invalid JSON" in p for p in report["problems"])
    assert tree_digest(imagefolder) == before


def test_verify_applies_exif_orientation(imagefolder, tmp_path):
    run(["verify", str(imagefolder), "--workers", "1", "--out_json", str(tmp_path / "v.json")])
    rows = [r for log in (tmp_path / "v.json.parts").glob("results-*.jsonl")
            for line in log.read_text().splitlines() for r in json.loads(line)["rows"]]
    rotated = next(r for r in rows if r["name"] == "rotated.jpg")
    assert (rotated["width"], rotated["height"]) == (192, 128)


def test_verify_parquet_reports_cut_shard_bad_rows_and_non_text_captions(parquet_folder, tmp_path):
    before = tree_digest(parquet_folder)
    report = run(["verify", str(parquet_folder), "--workers", "2", "--out_json", str(tmp_path / "p.json")])
    assert report["layout"] == "parquet" and report["n_images"] == 6 and report["n_readable"] == 5
    assert [c.split(":")[0] for c in report["corrupt"]] == ["data/train-00000-of-00003.parquet#3"]
    assert sorted(report["missing_caption"]) == ["data/train-00000-of-00003.parquet#2: no caption",
                                                 "data/train-00001-of-00003.parquet#0: caption is not text (int)"]
    assert any("train-00002-of-00003.parquet: not a readable Parquet shard" in p for p in report["problems"])
    assert tree_digest(parquet_folder) == before


def test_other_column_names(tmp_path):
    root = tmp_path / "renamed"
    root.mkdir()
    table = pa.table({"jpg": pa.array([pictures()["noise.png"]], pa.binary()), "caption": ["noise"]})
    pq.write_table(table, root / "a.parquet")
    report = run(["filter", str(root), "--out", str(tmp_path / "out"), "--workers", "1",
                  "--image_column", "jpg", "--caption_column", "caption"])
    assert report["n_passed"] == 1
    with pytest.raises(SystemExit) as stop:
        exit_on_usage_error("prepare_data.py", run, ["verify", str(root), "--workers", "1"])
    assert stop.value.code == 2  # the default image column is not there: a one-line error naming the flag


# ------------------------------------------------------------------ filter


def reference_scores(data):
    """Independent references: the authors' skimage loop, Pillow's JPEG, scipy's Laplacian, numpy's patch std."""
    rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int64)
    y = (9798 * rgb[..., 0] + 19235 * rgb[..., 1] + 3735 * rgb[..., 2] + (1 << 14)) >> 15
    glcm = [shannon_entropy(graycomatrix((y[i:i + 64, j:j + 64] // 4).astype(np.uint8), [1, 2, 3, 4],
                                         [0, np.pi / 4, np.pi / 2, np.pi * 3 / 4], levels=64, normed=True))
            for i in range(0, y.shape[0] - 63, 64) for j in range(0, y.shape[1] - 63, 64)]
    buf = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8)).save(buf, format="JPEG", quality=95)
    lap = ndimage.laplace(y.astype(np.float64))[1:-1, 1:-1]
    stds = [y[i:i + 64, j:j + 64].std() for i in range(0, y.shape[0] - 63, 64) for j in range(0, y.shape[1] - 63, 64)]
    return {"glcm": np.mean(glcm), "compression_ratio": rgb.size / buf.tell(), "laplacian_var": lap.var(),
            "flat_share": np.mean(np.array(stds) < 2.0)}


def read_scores(out):
    """scores.csv as {file: row} with numbers."""
    import csv
    with open(out / "scores.csv", newline="") as f:
        return {r["file"]: {k: (float(v) if k not in ("file", "failed") and v != "" else v) for k, v in r.items()}
                for r in csv.DictReader(f)}


def test_filter_scores_equal_independent_references(imagefolder, tmp_path):
    out = tmp_path / "out"
    run(["filter", str(imagefolder), "--out", str(out), "--workers", "1"])
    scores = read_scores(out)
    assert set(scores) == {"noise.png", "flat.png", "ramp.png", "tiny.png", "rotated.jpg", "copy_of_noise.png"}
    for name in ("noise.png", "flat.png", "ramp.png"):
        expected = reference_scores((imagefolder / name).read_bytes())
        for key, value in expected.items():
            assert scores[name][key] == pytest.approx(value, abs=1e-9, rel=1e-9), (name, key)
    assert math.isnan(scores["tiny.png"]["glcm"])
    report = json.loads((out / "filter_report.json").read_text())
    assert any(p.startswith("tiny.png: 30x40 is too small") for p in report["problems"])
    assert any(p.startswith("number.png: caption is not text") for p in report["problems"])
    assert any(p.startswith("cut.png:") for p in report["problems"])


def test_filter_thresholds_each_apply_only_when_given(imagefolder, tmp_path):
    passed = {}
    for flags in ([], ["--min_glcm", "3"], ["--max_flat_share", "0.5"], ["--min_short_side", "129"],
                  ["--min_compression_ratio", "10"]):
        out = tmp_path / "out"  # one folder: new thresholds reuse the scores
        run(["filter", str(imagefolder), "--out", str(out), "--workers", "1", *flags])
        records, _ = read_metadata(out)
        passed[" ".join(flags)] = sorted(r["image"].name for r in records)
    everything = ["flat.png", "noise.png", "ramp.png", "rotated.jpg", "tiny.png"]  # copy_of_noise.png: a duplicate
    assert passed[""] == everything
    assert passed["--min_glcm 3"] == ["noise.png", "rotated.jpg"]  # NaN fails too
    assert passed["--max_flat_share 0.5"] == ["noise.png", "ramp.png", "rotated.jpg"]
    assert passed["--min_short_side 129"] == ["noise.png", "ramp.png"]
    assert passed["--min_compression_ratio 10"] == ["flat.png", "ramp.png"]


def test_filter_drops_exact_duplicates_after_the_first_unless_told_to_keep_them(imagefolder, tmp_path):
    assert (imagefolder / "copy_of_noise.png").read_bytes() == (imagefolder / "noise.png").read_bytes()
    out = tmp_path / "out"
    report = run(["filter", str(imagefolder), "--out", str(out), "--workers", "1"])
    scores = read_scores(out)
    assert scores["copy_of_noise.png"]["failed"] == "duplicate" and scores["copy_of_noise.png"]["passed"] == 0
    assert scores["noise.png"]["passed"] == 1  # the first one, in metadata order, is kept
    assert report["n_duplicates"] == 1 and report["failed"] == {"duplicate": 1}
    assert "copy_of_noise.png: the same bytes as noise.png, dropped (--keep_duplicates keeps it)" in report["problems"]
    with_flag = run(["filter", str(imagefolder), "--out", str(out), "--workers", "1", "--keep_duplicates",
                     "--min_glcm", "3"])
    records, _ = read_metadata(out)
    assert sorted(r["image"].name for r in records) == ["copy_of_noise.png", "noise.png", "rotated.jpg"]
    assert with_flag["n_duplicates"] == 0 and "duplicate" not in with_flag["failed"]


def test_filter_metadata_points_at_the_originals(imagefolder, tmp_path):
    out = tmp_path / "elsewhere" / "out"
    run(["filter", str(imagefolder), "--out", str(out), "--workers", "1", "--min_glcm", "3"])
    records, problems = read_metadata(out)
    assert not any(problems.values())
    assert {r["image"].resolve() for r in records} == {(imagefolder / n).resolve() for n in
                                                       ("noise.png", "rotated.jpg")}
    assert not list(out.glob("*.png"))  # not a byte copied


def test_filter_parquet_points_at_rows(parquet_folder, tmp_path):
    out = tmp_path / "out"
    run(["filter", str(parquet_folder), "--out", str(out), "--workers", "1", "--min_glcm", "3"])
    lines = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [(line["row"], line["text"]) for line in lines] == [(0, "noise"), (4, "rotated")]
    assert all((out / line["parquet_file"]).resolve() == parquet_folder / "data" / "train-00000-of-00003.parquet"
               for line in lines)


# ------------------------------------------------------------------ resuming and sharding


def test_a_rerun_skips_finished_chunks_and_a_torn_line_is_redone(imagefolder, tmp_path, monkeypatch):
    out = tmp_path / "out"
    first = run(["filter", str(imagefolder), "--out", str(out), "--workers", "1"])
    log = out / ".prepare" / "results-0-of-1.jsonl"
    lines = log.read_text().splitlines()
    assert len(lines) == 1  # 10 images: one chunk
    log.write_text(lines[0][:50])  # a run killed while writing
    calls = []
    real = prepare_data.process_chunk
    monkeypatch.setattr(prepare_data, "process_chunk", lambda chunk, **kw: calls.append(chunk["id"]) or real(chunk, **kw))
    assert run(["filter", str(imagefolder), "--out", str(out), "--workers", "1"]) == first
    assert calls == ["files:0"]
    calls.clear()
    run(["filter", str(imagefolder), "--out", str(out), "--workers", "1", "--min_glcm", "1"])
    assert calls == []  # everything scored: only the thresholds change


def test_shards_split_the_work_and_the_last_one_writes_the_outputs(parquet_folder, tmp_path):
    whole = run(["filter", str(parquet_folder), "--out", str(tmp_path / "whole"), "--workers", "1"])
    out = tmp_path / "split"
    assert run(["filter", str(parquet_folder), "--out", str(out), "--workers", "1", "--shard", "1/2"]) is None
    assert not (out / "scores.csv").exists()
    assert run(["filter", str(parquet_folder), "--out", str(out), "--workers", "1", "--shard", "0/2"]) == whole
    assert (out / "scores.csv").read_text() == (tmp_path / "whole" / "scores.csv").read_text()


def test_another_input_in_the_same_work_folder_is_refused(imagefolder, parquet_folder, tmp_path):
    run(["filter", str(imagefolder), "--out", str(tmp_path / "out"), "--workers", "1"])
    with pytest.raises(prepare_data.UsageError, match="another input"):
        run(["filter", str(parquet_folder), "--out", str(tmp_path / "out"), "--workers", "1"])
    with pytest.raises(prepare_data.UsageError, match="inside DATA_DIR"):
        run(["filter", str(imagefolder), "--out", str(imagefolder / "sub"), "--workers", "1"])


# ------------------------------------------------------------------ eval sets


@pytest.mark.parametrize("layout", ["parquet", "imagefolder"])
def test_make_eval_set_keeps_short_sides_above_the_size(tmp_path, layout):
    root = tmp_path / "big"
    (root / "data").mkdir(parents=True)
    sizes = {"big.png": (2049, 2300), "equal.png": (2048, 3000), "small.png": (1000, 1000), "wide.png": (4100, 2050)}
    rows = [(n, encode(detailed(h, w)), f"caption of {n}") for n, (h, w) in sizes.items()]
    if layout == "parquet":
        write_shard(root / "data" / "train.parquet", rows)
    else:
        for name, data, _ in rows:
            (root / name).write_bytes(data)
        (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": t}) + "\n"
                                                     for n, _, t in rows))
    out = tmp_path / "eval"
    report = run(["make_eval_set", str(root), "--size", "2048", "--out", str(out), "--workers", "1"])
    assert report["n_selected"] == 2 and report["n_too_small"] == 2
    records, _ = read_metadata(out)
    assert [r["text"] for r in records] == ["caption of big.png", "caption of wide.png"]
    assert [Image.open(r["image"]).size for r in records] == [(2300, 2049), (2050, 4100)]
    assert records[0]["image"].read_bytes() == rows[0][1]  # the original bytes
    samples = fid_metrics.read_eval_set(out / "metadata.jsonl")  # what generate_and_eval_fid.py reads
    assert [s["prompt"] for s in samples] == ["caption of big.png", "caption of wide.png"]
    assert run(["make_eval_set", str(root), "--size", "4096", "--out", str(tmp_path / "e4"),
                "--workers", "1"])["n_selected"] == 0


def detailed(h, w):
    """An image with no flat 64x64 patch (luma standard deviation 5 in each) that PNG stores in a few kB."""
    return np.broadcast_to((np.indices((h, w)).sum(axis=0) % 2 * 10).astype(np.uint8)[..., None], (h, w, 3)).copy()


def test_make_eval_set_leaves_out_flat_images_and_duplicates_unless_told_not_to(tmp_path):
    root = tmp_path / "big"
    root.mkdir()
    card = np.clip(128 + np.random.default_rng(0).normal(0, 1, (2100, 2200, 1)), 0, 255).astype(np.uint8)
    files = {"photo.png": encode(detailed(2100, 2200)), "grey_card.png": encode(card.repeat(3, axis=2)),
             "again.png": encode(detailed(2100, 2200)), "other.png": encode(detailed(2101, 2200))}
    assert prepare_data.flat_share(prepare_data.luma(card.repeat(3, axis=2)), 2.0) == 1.0  # every patch flat
    for name, data in files.items():
        (root / name).write_bytes(data)
    (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": n}) + "\n" for n in files))
    report = run(["make_eval_set", str(root), "--size", "2048", "--out", str(tmp_path / "eval"), "--workers", "1"])
    records, _ = read_metadata(tmp_path / "eval")
    assert [r["text"] for r in records] == ["photo.png", "other.png"]
    assert (report["n_flat"], report["n_duplicates"], report["max_flat_share"]) == (1, 1, prepare_data.FLAT_IMAGE)
    assert any(p.startswith("grey_card.png: flat share 1.00 above --max_flat_share") for p in report["problems"])
    assert "again.png: the same bytes as photo.png, left out (--keep_duplicates keeps it)" in report["problems"]
    everything = run(["make_eval_set", str(root), "--size", "2048", "--out", str(tmp_path / "all"), "--workers", "1",
                      "--max_flat_share", "1", "--keep_duplicates"])
    records, _ = read_metadata(tmp_path / "all")
    assert [r["text"] for r in records] == list(files) and everything["n_flat"] == everything["n_duplicates"] == 0


def test_bad_flags_are_usage_errors(tmp_path):
    for argv in (["verify", "x", "--shard", "2/2"], ["verify", "x", "--workers", "0"],
                 ["make_eval_set", "x", "--size", "1024", "--out", "y"]):
        with pytest.raises(SystemExit) as stop:
            prepare_data.parse_args(argv)
        assert stop.value.code == 2
    with pytest.raises(prepare_data.UsageError, match="neither a metadata.jsonl"):
        run(["verify", str(tmp_path)])


def test_flat_share_counts_patches_whose_luma_std_is_below_the_threshold():
    checker = np.where((np.arange(64)[:, None] + np.arange(64)[None, :]) % 2, 1, -1)  # mean 0, std 1
    y = np.full((128, 192), 100, np.int32)
    y[:64, :64] += 2 * checker      # std 2.0: not below 2.0
    y[:64, 64:128] += checker       # std 1.0: flat
    y[64:, :64] += 3 * checker      # std 3.0
    assert prepare_data.flat_share(y, 2.0) == pytest.approx(4 / 6)  # plus the two untouched patches
    assert prepare_data.flat_share(y, 2.5) == pytest.approx(5 / 6)
    assert prepare_data.parse_args(["verify", "x"]).flat_std == 2.0


def test_a_damaged_row_group_is_reported_row_by_row_and_the_rest_is_scored(tmp_path):
    root = tmp_path / "hub"
    root.mkdir()
    p = pictures()
    shard = root / "train.parquet"
    write_shard(shard, [("a", p["noise.png"], "a"), ("b", p["flat.png"], "b"), ("c", p["ramp.png"], "c")])
    column = pq.ParquetFile(shard).metadata.row_group(1).column(0)  # the image column of the second row group
    data = bytearray(shard.read_bytes())
    data[column.data_page_offset:column.data_page_offset + 40] = b"\xff" * 40  # its page header destroyed
    shard.write_bytes(bytes(data))
    report = run(["verify", str(root), "--workers", "1", "--out_json", str(tmp_path / "v.json")])
    assert report["n_images"] == 3 and report["n_readable"] == 2
    assert report["corrupt"][0].startswith("train.parquet#2: row group 1 unreadable")


# ------------------------------------------------------------------ paths that leave the folder, changed input


@pytest.fixture
def escaping_folder(tmp_path):
    """An imagefolder whose metadata names, beside two good images, a real image outside it by ../ and one by an
    absolute path."""
    root, secret = tmp_path / "data", tmp_path / "secret"
    (root / "sub").mkdir(parents=True)
    secret.mkdir()
    for seed, path in enumerate((root / "ok.png", root / "sub" / "deep.png", secret / "x.png", secret / "y.png")):
        path.write_bytes(encode(np.random.default_rng(seed).integers(0, 256, (160, 192, 3), dtype=np.uint8)))
    lines = [{"file_name": "ok.png", "text": "inside"}, {"file_name": "sub/../sub/deep.png", "text": "inside too"},
             {"file_name": "../secret/x.png", "text": "outside"}, {"file_name": str(secret / "y.png"), "text": "abs"}]
    (root / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root


def test_rows_leaving_the_dataset_folder_are_refused_counted_and_never_copied(escaping_folder, tmp_path):
    report = run(["make_eval_set", str(escaping_folder), "--size", "2048", "--out", str(tmp_path / "eval"),
                  "--workers", "1"])
    assert report["n_refused_paths"] == 2 and report["n_images"] == 2
    assert sum("../secret/x.png' leads outside" in p for p in report["problems"]) == 1
    assert sum("y.png' is an absolute path" in p for p in report["problems"]) == 1
    report = run(["filter", str(escaping_folder), "--out", str(tmp_path / "kept"), "--workers", "1"])
    assert report["n_refused_paths"] == 2 and report["n_passed"] == 2
    assert sorted(read_scores(tmp_path / "kept")) == ["ok.png", "sub/../sub/deep.png"]
    verified = run(["verify", str(escaping_folder), "--workers", "1", "--out_json", str(tmp_path / "v.json")])
    assert verified["n_refused_paths"] == 2 and verified["n_images"] == 2  # the two refused: neither read nor listed


def test_a_filter_output_may_point_into_its_source_folder_and_nowhere_else(imagefolder, tmp_path):
    out = tmp_path / "kept"
    run(["filter", str(imagefolder), "--out", str(out), "--workers", "1", "--min_glcm", "3", "--keep_duplicates"])
    records, problems = read_metadata(out)
    assert len(records) == 3 and not any(problems.values())  # ../folder/noise.png: inside the source folder
    (tmp_path / "elsewhere.png").write_bytes(pictures()["noise.png"])
    with open(out / "metadata.jsonl", "a") as handle:  # a line edited to point beside the source folder
        handle.write(json.dumps({"file_name": "../elsewhere.png", "text": "not from the source"}) + "\n")
    records, problems = read_metadata(out)
    assert len(records) == 3 and problems["metadata_lines"] == [
        f"line 4: '../elsewhere.png' leads outside {imagefolder.resolve()}: refused, not read"]
    items, _, read_problems = prepare_data.read_imagefolder(out)  # the filter output as prepare_data's input
    assert len(items) == 3 and sum(p.endswith("refused, not read") for p in read_problems) == 1


def test_a_rerun_on_changed_input_says_what_changed_and_overwrite_starts_afresh(imagefolder, tmp_path, capsys):
    out = tmp_path / "out"
    run(["filter", str(imagefolder), "--out", str(out), "--workers", "1"])
    (imagefolder / "new.png").write_bytes(pictures()["ramp.png"])
    with open(imagefolder / "metadata.jsonl", "a") as handle:
        handle.write(json.dumps({"file_name": "new.png", "text": "added later"}) + "\n")
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        exit_on_usage_error("prepare_data.py", run, ["filter", str(imagefolder), "--out", str(out), "--workers", "1"])
    message = capsys.readouterr().err
    assert stop.value.code == 2 and len(message.strip().splitlines()) == 1
    assert "changed since the work" in message and "1 file(s) added, e.g. new.png" in message
    assert "--overwrite" in message
    report = run(["filter", str(imagefolder), "--out", str(out), "--workers", "1", "--overwrite"])
    assert "new.png" in read_scores(out) and report["n_scored"] == 7
    (imagefolder / "flat.png").write_bytes(pictures()["noise.png"])  # the same name, other bytes
    with pytest.raises(prepare_data.UsageError, match="1 file\\(s\\) changed, e.g. flat.png"):
        run(["filter", str(imagefolder), "--out", str(out), "--workers", "1"])


def test_overwrite_replaces_the_copied_eval_images(tmp_path):
    root = tmp_path / "big"
    root.mkdir()
    rng = np.random.default_rng(0)  # textured: flat images are left out of evaluation sets
    pixels = [rng.integers(0, 256, (2100, 2100, 3), dtype=np.uint8) for _ in range(2)]
    (root / "a.png").write_bytes(encode(pixels[0]))
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "a"}) + "\n")
    out = tmp_path / "eval"
    run(["make_eval_set", str(root), "--size", "2048", "--out", str(out), "--workers", "1"])
    (root / "a.png").write_bytes(encode(pixels[1]))
    with pytest.raises(prepare_data.UsageError, match="--overwrite"):
        run(["make_eval_set", str(root), "--size", "2048", "--out", str(out), "--workers", "1"])
    run(["make_eval_set", str(root), "--size", "2048", "--out", str(out), "--workers", "1", "--overwrite"])
    assert (out / "images" / "00000.png").read_bytes() == (root / "a.png").read_bytes()
