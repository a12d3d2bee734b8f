"""patch-FID (FID over crops at native resolution) and the Inception features the FID-family metrics keep.

Crops: `patches_per_image` boxes of patch_size × patch_size per image, placed uniformly at random over the whole
image at its own resolution (no resize before cropping), from a generator seeded with (seed, image index), so a
seed gives the same boxes on every run and every machine. Each crop then goes through the same Inception as the
whole-image FID (at the default 299² crop its resize to 299 is the identity). PROTOCOL.md §6 names the source of
the definition and its defaults.
"""
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from errors import UsageError
from fid_metrics import to_uint8_tensor
from imagefolder import load_image

# UltraPixel's FID-patch as its authors state it (PROTOCOL.md §6): crops the size of the feature extractor's input
# (Inception v3: 299, so a crop reaches Inception at 1:1), three per image.
PATCH_SIZE = 299
PATCHES_PER_IMAGE = 3
PATCH_SEED = 0
FEATURES_FILE = "features.npz"


#################################################################################
#                                    Crops                                      #
#################################################################################

def patch_boxes(width, height, patch_size, patches_per_image, seed, index):
    """[(left, top)] of the crops of image number `index`: uniform over every position a full crop fits at."""
    if width < patch_size or height < patch_size:
        raise UsageError(f"patch-FID: image {index} is {width}×{height}, smaller than --patch_size {patch_size}; "
                         f"pass a --patch_size of at most {min(width, height)}.")
    rng = np.random.default_rng([seed, index])
    lefts = rng.integers(0, width - patch_size + 1, size=patches_per_image)
    tops = rng.integers(0, height - patch_size + 1, size=patches_per_image)
    return [(int(left), int(top)) for left, top in zip(lefts, tops)]


def image_patches(image, patch_size, patches_per_image, seed, index):
    """uint8 tensor (patches_per_image, 3, patch_size, patch_size) of a PIL image's crops."""
    tensor = to_uint8_tensor(image)
    boxes = patch_boxes(tensor.shape[2], tensor.shape[1], patch_size, patches_per_image, seed, index)
    return torch.stack([tensor[:, top:top + patch_size, left:left + patch_size] for left, top in boxes])


class PatchPairs(torch.utils.data.Dataset):
    """Per sample: the crops of the generated image and of its real image (each at its own resolution)."""

    def __init__(self, samples, image_paths, patch_size, patches_per_image, seed):
        self.samples, self.image_paths = samples, image_paths
        self.crop = dict(patch_size=patch_size, patches_per_image=patches_per_image, seed=seed)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        generated = image_patches(load_image(self.image_paths[i]), index=i, **self.crop)
        real = image_patches(load_image(self.samples[i]["real_image"]), index=i, **self.crop)
        return generated, real


#################################################################################
#                              Recording features                               #
#################################################################################

@contextmanager
def recorded_features(metric):
    """Inside the block, every `metric.update(images, real)` of a torchmetrics FID also appends its Inception
    features (float64 numpy rows) to recorded["real"] or recorded["generated"]; the FID sums are unchanged."""
    recorded, side = {"real": [], "generated": []}, {}
    update = metric.update

    def hook(module, inputs, output):
        if "now" in side:
            recorded[side["now"]].append(output.detach().double().reshape(len(output), -1).cpu().numpy())

    def recording_update(imgs, real):
        side["now"] = "real" if real else "generated"
        try:
            return update(imgs, real=real)
        finally:
            side.pop("now")

    handle = metric.inception.register_forward_hook(hook)
    metric.update = recording_update
    try:
        yield recorded
    finally:
        metric.update = update
        handle.remove()
        for key, rows in recorded.items():
            recorded[key] = np.concatenate(rows) if rows else np.zeros((0, 0))


def concatenate_sides(batch):
    """DataLoader collate: [(generated crops, real crops)] -> [all generated crops, all real crops]."""
    return [torch.cat(side) for side in zip(*batch)]


def patch_fid_features(samples, image_paths, metric, patch_size=PATCH_SIZE, patches_per_image=PATCHES_PER_IMAGE,
                       seed=PATCH_SEED, batch_size=4, num_workers=2, progress=True):
    """patch-FID of the generated images against the real ones -> (value, {"real", "generated"} features)."""
    loader = torch.utils.data.DataLoader(PatchPairs(samples, image_paths, patch_size, patches_per_image, seed),
                                         batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=concatenate_sides)
    metric.reset()
    with recorded_features(metric) as features, torch.no_grad():
        for generated, real in tqdm(loader, desc="patch-FID", unit="batch", disable=not progress):
            metric.update(generated.to(metric.device), real=False)
            metric.update(real.to(metric.device), real=True)
    return float(metric.compute()), features


#################################################################################
#                                 Feature files                                 #
#################################################################################

def save_features(path, **arrays):
    """Write the arrays to an .npz through a temporary file (a killed run leaves the old file or the new one)."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial.npz")
    try:
        np.savez(partial, **arrays)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def load_features(path):
    """{name: array} of a features.npz, or {} when there is none."""
    path = Path(path)
    if not path.is_file():
        return {}
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}
