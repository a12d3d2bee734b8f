"""The Hugging Face imagefolder layout that training and evaluation read (metadata.jsonl records and RGB images), and
the training data stream both trainers draw from it: seeded crops keyed by (epoch, index), dealt to the processes."""
import abc
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset, Sampler

from errors import UsageError
from parquet_shards import IMAGE_COLUMN, open_row_image

IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)  # what a bad image file raises
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
REFUSED = "refused, not read"  # the end of the problem line of a row whose path leaves its folder


def is_text(value):
    """Whether `value` is absent or a string that is valid Unicode text (no lone surrogates: no undecodable bytes)."""
    if not isinstance(value, str):
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def json_lines(lines, problems, prefix="line"):
    """(line number, parsed value) of each non-blank line of a JSON-lines file; a line that is not JSON is noted in
    `problems` as "PREFIX N: invalid JSON (...)" and skipped."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as error:
            problems.append(f"{prefix} {number}: invalid JSON ({error.msg})")


def rows_folder(folder):
    """The folder a metadata.jsonl's rows must stay inside: its own, or for prepare_data.py filter's output the source
    folder its .prepare/settings.json names (its rows point at the originals there)."""
    try:
        saved = json.loads((Path(folder) / ".prepare" / "settings.json").read_text())
    except (OSError, ValueError):
        return Path(folder)
    source = saved.get("data_dir") if isinstance(saved, dict) and saved.get("command") == "filter" else None
    return Path(source) if isinstance(source, str) else Path(folder)


def outside_problem(name, folder, root):
    """Why a row's path `name` (relative to `folder`) is refused, or None: absolute, or leading outside `root`. The
    path is checked as written, its `..` folded, without following links inside `root` (the Hub's cache keeps its
    files as links to blobs elsewhere)."""
    if os.path.isabs(name) or Path(name).drive:
        return f"{name!a} is an absolute path: {REFUSED}"
    target, base = os.path.normpath(os.path.join(os.path.realpath(folder), name)), os.path.realpath(root)
    if os.path.commonpath([target, base]) != base:
        return f"{name!a} leads outside {root}: {REFUSED}"
    return None


def read_metadata(path, require_text=True, rows=False):
    """Usable {"file_name", "text", "image"} records of an imagefolder's metadata.jsonl (the file, or its folder),
    and the skipped lines: {"metadata_lines": [...], "missing_images": [...]}, each entry naming its line.

    A line is skipped when it is not JSON, lacks a non-empty `file_name` or `text`, holds a value that is not
    valid UTF-8 text, names an image outside the jsonl's folder (absolute, or `..` out of it; prepare_data.py filter's
    output: outside its source folder), never read, or names an image that does not exist (`file_name` is relative to
    the jsonl's folder).
    require_text False: `text` may be empty or absent (VAE data such as SA-1B's). rows True: a line may instead
    point at a row of a Parquet shard (`parquet_file`, relative to the jsonl's folder, and `row`, as prepare_data.py
    filter writes): its record has "parquet_file" and "row". Images are not decoded here.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "metadata.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: an imagefolder needs a metadata.jsonl holding one JSON object a "
                                f"line with 'file_name' (relative to its folder) and 'text'")
    records, bad_lines, missing, root = [], [], [], rows_folder(path.parent)
    with open(path, encoding="utf-8", errors="surrogateescape") as lines:  # bad bytes -> lone surrogates
        for number, entry in json_lines(lines, bad_lines):
            if rows and isinstance(entry, dict) and "parquet_file" in entry and "file_name" not in entry:
                entry = parquet_row_entry(entry, path.parent, root, number, bad_lines, missing)
                if entry:
                    records.append(entry)
                continue
            for key in ("file_name", "text") if require_text else ("file_name",):
                if not isinstance(entry, dict) or not isinstance(entry.get(key), str) or not entry[key].strip():
                    bad_lines.append(f"line {number}: no '{key}'")
                    break
            else:
                image = path.parent / entry["file_name"]
                if not is_text(entry["file_name"]) or not is_text(entry.get("text")):
                    bad_lines.append(f"line {number}: {entry['file_name']!a}: not valid UTF-8 text")
                elif refused := outside_problem(entry["file_name"], path.parent, root):
                    bad_lines.append(f"line {number}: {refused}")
                elif not image.is_file():
                    missing.append(f"line {number}: {entry['file_name']} does not exist")
                else:
                    text = entry.get("text") if isinstance(entry.get("text"), str) else ""
                    records.append({"file_name": entry["file_name"], "text": text, "image": image})
    return records, {"metadata_lines": bad_lines, "missing_images": missing}


def parquet_row_entry(entry, folder, root, number, bad_lines, missing):
    """The record of a metadata line pointing at a Parquet row (its shard inside `root`), or None with the reason
    appended to a list."""
    shard, row, text = entry.get("parquet_file"), entry.get("row"), entry.get("text")
    if not isinstance(shard, str) or not isinstance(row, int) or row < 0:
        bad_lines.append(f"line {number}: 'parquet_file' needs a path and 'row' a row number")
    elif not isinstance(text, str) or not text.strip():
        bad_lines.append(f"line {number}: no 'text'")
    elif not is_text(text) or not is_text(shard):
        bad_lines.append(f"line {number}: {shard!a}: not valid UTF-8 text")
    elif refused := outside_problem(shard, folder, root):
        bad_lines.append(f"line {number}: {refused}")
    elif not (folder / shard).is_file():
        missing.append(f"line {number}: {shard} does not exist")
    else:
        return {"file_name": f"{shard}#{row}", "text": text, "parquet_file": folder / shard, "row": row,
                "image_column": entry.get("image_column", IMAGE_COLUMN)}
    return None


def find_images(data_dir, label, suffixes=None):
    """(paths, found) of a folder of images: an imagefolder's listed images (its metadata.jsonl; `text` may be empty,
    as in SA-1B's) with its skipped lines in found ({"metadata_lines", "missing_images"}, read_metadata's), else every
    file below it (not hidden ones; with `suffixes`, only names ending in one of them). `label` names the folder in
    errors (e.g. "--data_dir PATH")."""
    root = Path(data_dir)
    if not root.is_dir():
        raise UsageError(f"{label} is not a folder: pass an imagefolder (metadata.jsonl + images) or a folder of "
                         f"images.")
    found = {"metadata_lines": [], "missing_images": []}
    if (root / "metadata.jsonl").is_file():
        records, found = read_metadata(root, require_text=False)
        paths = [r["image"] for r in records]
    else:
        paths = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")
                       and (suffixes is None or p.suffix.lower() in suffixes))
    if not paths:
        problems = found["metadata_lines"] + found["missing_images"]
        raise UsageError(f"{label} holds no images ({'; '.join(problems[:3]) or 'no image files'}).")
    return paths, found


def list_folder_images(folder):
    """{file name: path} of the images directly in `folder` (hidden files and other files left out): how compare.py
    and study.py pair the images of runs made from the same prompts, by file name."""
    return {p.name: p for p in sorted(Path(folder).iterdir())
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")}


def list_images(data_dir, label, suffixes=None):
    """(paths, problems): find_images with the skipped lines in one list."""
    paths, found = find_images(data_dir, label, suffixes)
    return paths, found["metadata_lines"] + found["missing_images"]


def load_image(path):
    """An RGB image, EXIF orientation applied, fully decoded (so a truncated file fails here, not later)."""
    with Image.open(path) as image:
        return ImageOps.exif_transpose(image).convert("RGB")


def load_record_image(record, data_dir):
    """load_image of a record's file (`file_name` relative to data_dir), or of its Parquet row's bytes."""
    if "parquet_file" in record:
        return load_image(open_row_image(record["parquet_file"], record["row"], record["image_column"]))
    return load_image(Path(data_dir) / record["file_name"])


def crop_pixels(image, resolution, rng=None, flip=False):
    """Scaled to cover resolution × resolution, or (width, height) (bilinear, up-scaling a smaller image; for a square,
    the shorter side to the resolution), then a random crop drawn from `rng` (the centre crop when rng is None),
    optionally mirrored: a (3, height, width) float tensor in [-1, 1]."""
    width, height = (resolution, resolution) if isinstance(resolution, int) else resolution
    scale = max(width / image.width, height / image.height)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.BILINEAR)
    if rng is None:
        left, top = (size[0] - width) // 2, (size[1] - height) // 2
    else:
        left, top = int(rng.integers(size[0] - width + 1)), int(rng.integers(size[1] - height + 1))
    image = image.crop((left, top, left + width, top + height))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0


def is_upscaled(image, size):
    """Whether covering `size` (a square side, or (width, height)) scales the image up."""
    width, height = (size, size) if isinstance(size, int) else size
    return image.width < width or image.height < height


def collate(samples):
    """Stack the tensors of a list of samples; concatenate their problem lists ("unreadable", "upscaled")."""
    batch = {key: torch.stack([s[key] for s in samples]) for key, value in samples[0].items() if torch.is_tensor(value)}
    for key in ("unreadable", "upscaled"):
        batch[key] = [item for s in samples for item in s[key]]
    return batch


class KeyedImages(Dataset, abc.ABC):
    """Samples indexed by (epoch, index) keys (StreamSampler), so that crops and flips depend only on the seed, the
    epoch and the index: the same on resume and with any number of data-loader workers. An item that cannot be read
    is replaced by the next one, and the sample lists it under "unreadable" so the training loop can count it.

    Subclasses say how an item reads (`read(item, flip, rng)` -> dict of tensors) and what it is called (`name`).
    """

    def __init__(self, items, random_flip, seed):
        self.items, self.random_flip, self.seed = items, random_flip, seed

    def __len__(self):
        return len(self.items)

    def name(self, item):
        """How an item is named in the "unreadable" list: a path's file name."""
        return Path(item).name

    @abc.abstractmethod
    def read(self, item, flip, rng):
        """The sample of `item` (a dict of tensors and lists), mirrored when `flip`; random crops draw from `rng`."""

    def __getitem__(self, key):
        epoch, index = key
        rng = np.random.default_rng([self.seed, epoch, index])
        flip = self.random_flip and rng.random() < 0.5
        unreadable = []
        for attempt in range(len(self.items)):
            item = self.items[(index + attempt) % len(self.items)]
            try:
                sample = self.read(item, flip, rng)
            except IMAGE_ERRORS as error:
                unreadable.append(f"{self.name(item)}: {' '.join(str(error).split())[:120]}")
                continue
            sample["unreadable"] = unreadable
            return sample
        raise UsageError(f"None of the {len(self.items)} training images can be read: {'; '.join(unreadable[:3])}")


class StreamSampler(Sampler):
    """Endless (epoch, index) keys: one seeded permutation per epoch, cut into batches dealt round-robin to the
    processes, starting at global batch `start_batch` (so a resumed run sees exactly the data it would have)."""

    def __init__(self, size, batch_size, seed, rank=0, world_size=1, start_batch=0):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size, self.start_batch = rank, world_size, start_batch
        self._epoch, self._order = None, None

    def key(self, position):
        """(epoch, dataset index) of the position-th sample of the global stream."""
        epoch, offset = divmod(position, self.size)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.size)
        return epoch, int(self._order[offset])

    def __iter__(self):
        batch = self.start_batch + self.rank
        while True:
            for position in range(batch * self.batch_size, (batch + 1) * self.batch_size):
                yield self.key(position)
            batch += self.world_size


#################################################################################
#                              Aspect-ratio buckets                             #
#################################################################################

def bucket_sizes(resolution):
    """[(width, height)] of the aspect-ratio buckets at about resolution² pixels: Sana's 4096² table (PixArt's 40
    ratios from 1:4 to 4:1) scaled to the resolution, sides rounded to multiples of 32 (F=16 VAE, 2×2 patches)."""
    from diffusers.pipelines.sana.pipeline_sana import ASPECT_RATIO_4096_BIN

    sizes = []
    for height, width in ASPECT_RATIO_4096_BIN.values():
        size = tuple(max(32, round(side * resolution / 4096 / 32) * 32) for side in (width, height))
        if size not in sizes:
            sizes.append(size)
    return sizes


def nearest_bucket(width, height, buckets):
    """The bucket whose aspect ratio is nearest to width / height (in log ratio: 2:1 and 1:2 are as far from 1:1)."""
    return min(buckets, key=lambda b: abs(np.log(b[0] / b[1]) - np.log(width / height)))


def image_size(record, data_dir):
    """(width, height) of a record's image as displayed (EXIF orientation applied), from its header only."""
    source = (open_row_image(record["parquet_file"], record["row"], record["image_column"]) if "parquet_file" in record
              else Path(data_dir) / record["file_name"])
    with Image.open(source) as image:
        turned = image.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # these orientations swap width and height
        return (image.height, image.width) if turned else image.size


class BucketSampler(StreamSampler):
    """StreamSampler whose global batches (one batch on each process) each come from one bucket: per epoch, each
    bucket's indices in a seeded order, cut into global batches (the last one filled from the bucket's start), the
    batches of all buckets then in a seeded order. Keys depend only on (seed, position): resume stays exact."""

    def __init__(self, buckets, batch_size, seed, rank=0, world_size=1, start_batch=0):
        super().__init__(len(buckets), batch_size, seed, rank, world_size, start_batch)
        self.members = {}
        for index, bucket in enumerate(buckets):
            self.members.setdefault(bucket, []).append(index)

    def epoch_batches(self, epoch):
        """The epoch's global batches: lists of batch_size × world_size indices of one bucket."""
        rng, group, batches = np.random.default_rng([self.seed, epoch]), self.batch_size * self.world_size, []
        for bucket in sorted(self.members):
            members = rng.permutation(self.members[bucket])
            padded = np.resize(members, -(-len(members) // group) * group)  # repeats from the start to fill
            batches += [padded[k:k + group].tolist() for k in range(0, len(padded), group)]
        return [batches[k] for k in rng.permutation(len(batches))]

    def __iter__(self):
        group = self.batch_size * self.world_size
        per_epoch = sum(-(-len(m) // group) for m in self.members.values())  # the same every epoch
        batch, epoch, layout = self.start_batch + self.rank, None, None
        while True:
            (new_epoch, number), slot = divmod(batch // self.world_size, per_epoch), batch % self.world_size
            if new_epoch != epoch:
                epoch, layout = new_epoch, self.epoch_batches(new_epoch)
            for index in layout[number][slot * self.batch_size:(slot + 1) * self.batch_size]:
                yield epoch, index
            batch += self.world_size
