"""Trainer data beyond square imagefolders: Parquet shards read in place, filtered sets pointing at rows, and
aspect-ratio buckets (nearest bucket, one bucket per global batch over processes, exact resume, latent cache)."""
import io
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
import torch
from accelerate import PartialState
from safetensors import safe_open
from safetensors.torch import save_file
from skimage import data as skdata

import imagefolder
import prepare_data
import training
from partitioned_vae import check_size
from test_training import PHOTOS, make_dataset, train


def png(array):
    """PNG bytes of a uint8 array."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def make_parquet(folder, photos=PHOTOS, row_group_size=3):
    """The photos of make_dataset, in make_dataset's order, as one Hub-layout shard under data/."""
    (folder / "data").mkdir(parents=True, exist_ok=True)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows = [{"bytes": png(getattr(skdata, name)()), "path": f"{name}.png"} for name in photos]
    pq.write_table(pa.table({"image": pa.array(rows, image_type), "text": list(photos.values())}),
                   folder / "data" / "train-00000-of-00001.parquet", row_group_size=row_group_size)
    return folder


# ------------------------------------------------------------------ Parquet shards in the trainers


@pytest.mark.parametrize("cache_latents", [False, True])
def test_parquet_shards_train_exactly_as_the_same_imagefolder(tiny_ckpts, tmp_path, cache_latents):
    flags = ["--cache_latents"] if cache_latents else []
    folder = train("sd3", tiny_ckpts["sd3"], make_dataset(tmp_path / "folder"), tmp_path / "a", *flags,
                   cache=tmp_path / "cache_a")
    shards = train("sd3", tiny_ckpts["sd3"], make_parquet(tmp_path / "hub"), tmp_path / "b", *flags,
                   cache=tmp_path / "cache_b")
    assert shards["train_images"] == 4 and shards["losses"] == folder["losses"]


def test_a_filtered_parquet_set_trains_on_the_rows_it_points_at(tiny_ckpts, tmp_path):
    hub = make_parquet(tmp_path / "hub")
    prepare_data.main(prepare_data.parse_args(["filter", str(hub), "--out", str(tmp_path / "kept"), "--workers", "1",
                                               "--min_glcm", "0"]))
    records, problems = training.read_training_data(tmp_path / "kept")
    assert [(r["row"], r["text"]) for r in records] == list(enumerate(PHOTOS.values()))
    image = imagefolder.load_record_image(records[2], tmp_path / "kept")
    assert np.array_equal(np.asarray(image), skdata.chelsea())
    summary = train("sd3", tiny_ckpts["sd3"], tmp_path / "kept", tmp_path / "out")
    assert summary["status"] == "completed" and summary["train_images"] == 4


def test_rows_without_caption_and_a_cut_shard_are_reported_not_fatal(tiny_ckpts, tmp_path):
    hub = make_parquet(tmp_path / "hub")
    cut = hub / "data" / "train-00001-of-00002.parquet"
    cut.write_bytes((hub / "data" / "train-00000-of-00001.parquet").read_bytes()[:-30])
    table = pa.table({"image": pa.array([{"bytes": png(skdata.coffee()), "path": "x"}]), "text": pa.array([None],
                                                                                                          pa.string())})
    pq.write_table(table, hub / "data" / "extra.parquet")
    records, problems = training.read_training_data(hub)
    assert len(records) == 4
    assert any("train-00001-of-00002.parquet: not a readable Parquet shard" in p for p in problems.metadata_lines)
    assert "data/extra.parquet#0: no caption" in problems.metadata_lines


def test_rows_pointing_outside_the_dataset_folder_are_refused_and_counted(tmp_path):
    """A metadata row whose image or shard is absolute or leaves the folder by ../ is skipped and counted, never read;
    a filtered set's rows may point into the source folder its settings.json names, and nowhere else."""
    PartialState(cpu=True)  # the trainers' logger, which reports the skipped lines
    hub, data_dir = make_parquet(tmp_path / "hub"), tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "ok.png").write_bytes(png(skdata.camera()))
    (tmp_path / "secret.png").write_bytes(png(skdata.coffee()))
    shard = hub / "data" / "train-00000-of-00001.parquet"
    lines = [{"file_name": "ok.png", "text": "inside"}, {"file_name": "../secret.png", "text": "outside"},
             {"file_name": str(tmp_path / "secret.png"), "text": "absolute"},
             {"parquet_file": str(shard), "row": 0, "text": "an absolute shard"},
             {"parquet_file": "../hub/data/train-00000-of-00001.parquet", "row": 1, "text": "a shard outside"}]
    (data_dir / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    records, problems = training.read_training_data(data_dir)
    assert [r["file_name"] for r in records] == ["ok.png"]
    assert [p.split(":")[0] for p in problems.metadata_lines] == ["line 2", "line 3", "line 4", "line 5"]
    assert all(p.endswith("refused, not read") for p in problems.metadata_lines)
    kept = tmp_path / "kept"  # a filtered set of the shard: its rows point into hub/, which its settings.json names
    prepare_data.main(prepare_data.parse_args(["filter", str(hub), "--out", str(kept), "--workers", "1"]))
    assert len(training.read_training_data(kept)[0]) == 4
    with open(kept / "metadata.jsonl", "a") as handle:
        handle.write(json.dumps({"parquet_file": "../data/../hub/../data/ok.png", "row": 0, "text": "x"}) + "\n")
    records, problems = training.read_training_data(kept)
    assert len(records) == 4 and problems.metadata_lines == [
        f"line 5: '../data/../hub/../data/ok.png' leads outside {hub.resolve()}: refused, not read"]


# ------------------------------------------------------------------ aspect-ratio buckets


def test_bucket_table_is_sanas_at_4096_and_keeps_area_and_multiples_of_32():
    from diffusers.pipelines.sana.pipeline_sana import ASPECT_RATIO_4096_BIN

    assert imagefolder.bucket_sizes(4096) == [(int(w), int(h)) for h, w in ASPECT_RATIO_4096_BIN.values()]
    for resolution in (128, 1024, 2048):
        sizes = imagefolder.bucket_sizes(resolution)
        assert (resolution, resolution) in sizes and len(sizes) == len(set(sizes))
        for w, h in sizes:
            check_size(h, w)
            assert resolution < 1024 or (0.9 < w * h / resolution ** 2 < 1.05 and 0.24 < w / h < 4.2)


def test_each_image_goes_to_the_bucket_of_nearest_aspect_ratio():
    sizes = imagefolder.bucket_sizes(1024)
    rng = np.random.default_rng(0)
    for _ in range(200):
        w, h = (int(v) for v in rng.integers(100, 5000, 2))
        # reference: the smallest ratio of the two aspect ratios (larger over smaller), written out
        best = min(sizes, key=lambda b: max(b[0] / b[1] / (w / h), (w / h) / (b[0] / b[1])))
        got = imagefolder.nearest_bucket(w, h, sizes)
        assert math.isclose(max(got[0] / got[1] / (w / h), (w / h) / (got[0] / got[1])),
                            max(best[0] / best[1] / (w / h), (w / h) / (best[0] / best[1])))
    ratios = sorted(w / h for w, h in sizes)
    for a, b in zip(ratios, ratios[1:]):  # between the geometric and the arithmetic mean: nearer b in log ratio
        r = (math.sqrt(a * b) + (a + b) / 2) / 2
        got = imagefolder.nearest_bucket(r, 1.0, sizes)
        assert got[0] / got[1] == b
    assert imagefolder.nearest_bucket(3840, 2160, sizes) == (1344, 768)  # 16:9 -> Sana's 0.57 (1.75:1)
    assert imagefolder.nearest_bucket(2160, 3840, sizes) == (768, 1344)


def test_exif_rotation_swaps_the_bucket(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.zeros((100, 300, 3), np.uint8)).save(tmp_path / "r.jpg", exif=exif)
    assert imagefolder.image_size({"file_name": "r.jpg"}, tmp_path) == (100, 300)


def test_crop_covers_the_bucket_then_centre_crops():
    image = Image.fromarray(np.arange(60 * 200 * 3, dtype=np.uint32).reshape(60, 200, 3).astype(np.uint8))
    pixels = imagefolder.crop_pixels(image, (96, 64))
    assert pixels.shape == (3, 64, 96)
    # reference: scale by max(96/200, 64/60) = 16/15 -> 213x64, centre crop x from 58
    expected = np.asarray(image.resize((213, 64), Image.Resampling.BILINEAR))[:, 58:154]
    np.testing.assert_allclose(pixels.permute(1, 2, 0).numpy(), expected / 127.5 - 1, atol=1e-6)


def take(sampler, n):
    """The first n keys of a sampler."""
    stream = iter(sampler)
    return [next(stream) for _ in range(n)]


def test_bucket_sampler_one_bucket_per_global_batch_over_two_ranks_and_exact_resume():
    buckets = [(64, 64)] * 5 + [(96, 32)] * 3 + [(32, 96)] * 2
    batch = 2
    ranks = [take(imagefolder.BucketSampler(buckets, batch, 7, rank, 2), 80) for rank in (0, 1)]
    per_epoch = sum(-(-n // 4) for n in (5, 3, 2)) * 4  # global batches of 4, each bucket's last one filled
    for k in range(0, 80, batch):  # the k-th batch of each rank forms one global batch
        group = ranks[0][k:k + batch] + ranks[1][k:k + batch]
        assert len({buckets[i] for _, i in group}) == 1 and len({e for e, _ in group}) == 1
    epoch0 = [i for r in ranks for e, i in r if e == 0]
    assert len(epoch0) == per_epoch and set(epoch0) == set(range(10))
    for start in (2, 6, 9):  # resumed at global batch `start`: each rank continues exactly
        for rank in (0, 1):
            resumed = take(imagefolder.BucketSampler(buckets, batch, 7, rank, 2, start_batch=2 * start), 20)
            assert resumed == ranks[rank][start * batch:start * batch + 20]
    assert take(imagefolder.BucketSampler(buckets, batch, 8, 0, 2), 20) != ranks[0][:20]


def make_shapes(folder):
    """Photos cut to three shapes: wide, tall and square, captions the tiny tokenizers know."""
    folder.mkdir(parents=True)
    crops = {"astronaut": (slice(0, 160), slice(0, 480)), "coffee": (slice(0, 400), slice(0, 130)),
             "chelsea": (slice(0, 300), slice(0, 300)), "rocket": (slice(0, 150), slice(0, 420))}
    lines = []
    for name, (rows, cols) in crops.items():
        Image.fromarray(getattr(skdata, name)()[rows, cols]).save(folder / f"{name}.png")
        lines.append(json.dumps({"file_name": f"{name}.png", "text": PHOTOS[name]}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.mark.parametrize("cache_latents", [False, True])
def test_bucketed_training_counts_buckets_and_resumes_exactly(tiny_ckpts, tmp_path, cache_latents):
    data = make_shapes(tmp_path / "shapes")
    flags = ["--aspect_ratio_buckets"] + (["--cache_latents"] if cache_latents else [])
    straight = train("sd3", tiny_ckpts["sd3"], data, tmp_path / "straight", *flags, "--max_train_steps", "4",
                     cache=tmp_path / "cache")
    sizes = imagefolder.bucket_sizes(128)
    expected = {}
    for path in sorted(data.glob("*.png")):
        w, h = imagefolder.nearest_bucket(*Image.open(path).size, sizes)
        expected[f"{w}x{h}"] = expected.get(f"{w}x{h}", 0) + 1
    assert straight["buckets"] == expected and len(expected) == 3
    train("sd3", tiny_ckpts["sd3"], data, tmp_path / "split", *flags, "--max_train_steps", "2",
          "--checkpointing_steps", "2", cache=tmp_path / "cache")
    resumed = train("sd3", tiny_ckpts["sd3"], data, tmp_path / "split", *flags, "--max_train_steps", "4",
                    "--checkpointing_steps", "2", "--resume_from_checkpoint", "latest", cache=tmp_path / "cache")
    assert resumed["resumed_from_step"] == 2
    np.testing.assert_allclose(resumed["losses"], straight["losses"], rtol=1e-6)
    if cache_latents:  # cached at the bucket's size: latents of (height / 16, width / 16)
        shapes = set()
        for path in (tmp_path / "cache" / "latents").glob("*.safetensors"):
            with safe_open(path, "pt") as cached:
                shapes.add(tuple(cached.get_tensor("latent_dist").shape[1:]))
        assert shapes == {(int(k.split("x")[1]) // 16, int(k.split("x")[0]) // 16) for k in expected}


def test_buckets_off_by_default_train_square(tiny_ckpts, tmp_path):
    summary = train("sd3", tiny_ckpts["sd3"], make_dataset(tmp_path / "data"), tmp_path / "out",
                    "--max_train_steps", "1")
    assert summary["buckets"] is None and summary["settings"]["aspect_ratio_buckets"] is False


def test_each_sample_has_its_buckets_size_and_a_replacement_takes_it(tmp_path):
    data = make_shapes(tmp_path / "shapes")
    (data / "broken.png").write_bytes(b"not a png")
    records, _ = training.read_training_data(data)
    records.append({"file_name": "broken.png", "text": PHOTOS["rocket"], "image": data / "broken.png"})
    sizes = imagefolder.bucket_sizes(128)
    for record in records[:-1]:
        record["size"] = imagefolder.nearest_bucket(*imagefolder.image_size(record, data), sizes)
    records[-1]["size"] = (64, 256)  # the broken one's bucket: its replacement is read at this size
    save_file({"prompt_embeds": torch.zeros(2)}, tmp_path / "e.safetensors")
    dataset = training.TrainDataset(records, data, {PHOTOS[n]: tmp_path / "e.safetensors" for n in PHOTOS}, 128,
                                    True, False, 0)
    for index, record in enumerate(records):
        sample = dataset[(0, index)]
        assert sample["pixels"].shape == (3, record["size"][1], record["size"][0])
    assert sample["unreadable"] and sample["unreadable"][0].startswith("broken.png")


def test_latent_cache_keys_hold_the_bucket_size(tmp_path):
    data = make_shapes(tmp_path / "shapes")
    records, _ = training.read_training_data(data)
    square = training.latent_files(records, data, tmp_path, "vae", 128, torch.float32)
    bucketed = training.latent_files([{**r, "size": (192, 96)} for r in records], data, tmp_path, "vae", 128,
                                     torch.float32)
    other = training.latent_files([{**r, "size": (96, 192)} for r in records], data, tmp_path, "vae", 128,
                                  torch.float32)
    assert all(len({square[n], bucketed[n], other[n]}) == 3 for n in square)
