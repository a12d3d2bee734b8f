"""The Hugging Face imagefolder layout that training and evaluation read (metadata.jsonl records and RGB images), and
the training data stream both trainers draw from it: seeded crops keyed by (epoch, index), dealt to the processes."""
import abc
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset, Sampler

from errors import UsageError

IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)  # what a bad image file raises
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


def is_text(value):
    """Whether `value` is absent or a string that is valid Unicode text (no lone surrogates: no undecodable bytes)."""
    if not isinstance(value, str):
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_metadata(path, require_text=True):
    """Usable {"file_name", "text", "image"} records of an imagefolder's metadata.jsonl (the file, or its folder),
    and the skipped lines: {"metadata_lines": [...], "missing_images": [...]}, each entry naming its line.

    A line is skipped when it is not JSON, lacks a non-empty `file_name` or `text`, holds a value that is not
    valid UTF-8 text, or names an image that does not exist (`file_name` is relative to the jsonl's folder).
    require_text False: `text` may be empty or absent (VAE data such as SA-1B's). Images are not decoded here.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "metadata.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: an imagefolder needs a metadata.jsonl holding one JSON object a "
                                f"line with 'file_name' (relative to its folder) and 'text'")
    records, bad_lines, missing = [], [], []
    with open(path, encoding="utf-8", errors="surrogateescape") as lines:  # bad bytes -> lone surrogates
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as error:
                bad_lines.append(f"line {number}: invalid JSON ({error.msg})")
                continue
            for key in ("file_name", "text") if require_text else ("file_name",):
                if not isinstance(entry, dict) or not isinstance(entry.get(key), str) or not entry[key].strip():
                    bad_lines.append(f"line {number}: no '{key}'")
                    break
            else:
                image = path.parent / entry["file_name"]
                if not is_text(entry["file_name"]) or not is_text(entry.get("text")):
                    bad_lines.append(f"line {number}: {entry['file_name']!a}: not valid UTF-8 text")
                elif not image.is_file():
                    missing.append(f"line {number}: {entry['file_name']} does not exist")
                else:
                    text = entry.get("text") if isinstance(entry.get("text"), str) else ""
                    records.append({"file_name": entry["file_name"], "text": text, "image": image})
    return records, {"metadata_lines": bad_lines, "missing_images": missing}


def list_images(data_dir, label, suffixes=None):
    """(paths, problems) of a folder of images: an imagefolder's listed images (its metadata.jsonl; `text` may be
    empty, as in SA-1B's) with its skipped lines as problems, else every file below it (not hidden ones; with
    `suffixes`, only names ending in one of them). `label` names the folder in errors (e.g. "--data_dir PATH")."""
    root = Path(data_dir)
    if not root.is_dir():
        raise UsageError(f"{label} is not a folder: pass an imagefolder (metadata.jsonl + images) or a folder of "
                         f"images.")
    problems = []
    if (root / "metadata.jsonl").is_file():
        records, bad = read_metadata(root, require_text=False)
        paths, problems = [r["image"] for r in records], bad["metadata_lines"] + bad["missing_images"]
    else:
        paths = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")
                       and (suffixes is None or p.suffix.lower() in suffixes))
    if not paths:
        raise UsageError(f"{label} holds no images ({'; '.join(problems[:3]) or 'no image files'}).")
    return paths, problems


def load_image(path):
    """An RGB image, EXIF orientation applied, fully decoded (so a truncated file fails here, not later)."""
    with Image.open(path) as image:
        return ImageOps.exif_transpose(image).convert("RGB")


def crop_pixels(image, resolution, rng=None, flip=False):
    """Shorter side to `resolution` (bilinear, up-scaling a smaller image), then a random crop drawn from `rng` (the
    centre crop when rng is None), optionally mirrored: a (3, resolution, resolution) float tensor in [-1, 1]."""
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.BILINEAR)
    if rng is None:
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    else:
        left, top = int(rng.integers(size[0] - resolution + 1)), int(rng.integers(size[1] - resolution + 1))
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0


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
