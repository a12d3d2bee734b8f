"""GLCM Score and Compression Ratio (PROTOCOL.md §6): the authors' eval.py, exact, vectorised in torch (the
entropy on the CPU: a numba kernel).

GLCM Score: grey = OpenCV's BGR2GRAY, 64 levels, non-overlapping 64×64 patches, per patch the normed
GLCM of skimage (distances 1–4, angles 0, π/4, π/2, 3π/4) scored by `shannon_entropy` (entropy of the
histogram of its distinct values) or a `graycoprops` feature; mean over patches, then over images.
Compression Ratio: Σ raw RGB bytes / Σ JPEG (q95) bytes.
"""

import io
import math
import multiprocessing
import os
import warnings
from contextlib import contextmanager, nullcontext
from functools import lru_cache, partial

import numba
import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

import outputs
from errors import UsageError

GLCM_PROPS = ("entropy", "contrast", "dissimilarity", "homogeneity", "energy", "correlation", "ASM")
GLCM_LEVELS = 64
GLCM_DISTANCES = (1, 2, 3, 4)
GLCM_ANGLES = (0.0, np.pi / 4, np.pi / 2, np.pi * 3 / 4)  # the authors' list, as floats
N_OFFSETS = len(GLCM_DISTANCES) * len(GLCM_ANGLES)
N_CELLS = N_OFFSETS * GLCM_LEVELS ** 2  # values in one patch's normed GLCM
# Sidecars, metadata, results and saved features the generating scripts write beside images:
NOT_IMAGES = (".json", ".jsonl", ".csv", ".npz")
CSV_FIELDS = ("file", "width", "height", "n_patches", "glcm", "raw_bytes", "compressed_bytes",
              "compression_ratio")


#################################################################################
#                                Reading images                                 #
#################################################################################

def to_rgb8(image):
    """PIL image, path or uint8 H×W×3 array -> uint8 H×W×3 RGB, as OpenCV's `imread(IMREAD_COLOR)` reads it.

    EXIF orientation is applied; alpha is dropped (not composited); grey is replicated; 16-bit is
    reduced to its high byte (v >> 8); palettes are expanded; other modes go through Pillow's
    `convert("RGB")`. Animated files give their first frame.
    """
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected a uint8 H×W×3 RGB array, got {image.dtype} {image.shape}")
        return image
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as im:
            im.load()  # decode now so that truncated files fail here, naming the file
            return to_rgb8(im)
    im = ImageOps.exif_transpose(image)
    if im.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        grey = (np.clip(np.asarray(im, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    return np.asarray(im.convert("RGB"))


def grey64(rgb, device="cpu"):
    """uint8 RGB -> 64-level grey on `device`: OpenCV's COLOR_BGR2GRAY on uint8, then // 4.

    OpenCV (4.10, the authors' pin, to 5.0) computes Y = (9798·R + 19235·G + 3735·B + 2^14) >> 15 for
    uint8, checked on all 2^24 colours; the 14-bit form often quoted (4899, 9617, 1868) differs on 43,864.
    """
    if torch.device(device).type == "cpu":
        return torch.from_numpy(_grey64_kernel(np.ascontiguousarray(rgb)))
    t = torch.from_numpy(np.require(rgb, requirements=["C", "W"])).to(device).to(torch.int32)  # W: torch wants writable
    y = 9798 * t[..., 0] + 19235 * t[..., 1] + 3735 * t[..., 2] + (1 << 14)
    return (y >> 17).to(torch.uint8)  # (y >> 15) // 4


#################################################################################
#                                  GLCM Score                                   #
#################################################################################

def glcm_offsets(patch_size=64):
    """(row, col) offset and pair count of each (distance, angle) of skimage's graycomatrix, distance-major."""
    def round_half_away(x):  # skimage's _glcm_loop rounding
        return int(x + 0.5) if x > 0 else int(x - 0.5)

    out = []
    for d in GLCM_DISTANCES:
        for a in GLCM_ANGLES:
            dr, dc = round_half_away(math.sin(a) * d), round_half_away(math.cos(a) * d)
            out.append((dr, dc, max(patch_size - abs(dr), 0) * max(patch_size - abs(dc), 0)))
    return out


def glcm_counts(patches):
    """(B, S, S) 64-level patches -> co-occurrence counts (16, R·R, B) int32, lowest level (B,), R.

    Cells outside a patch's level range are zero, so only R levels from each patch's lowest are kept:
    cell (i, j) of offset o of patch p lies at [o, (i - lo)·R + (j - lo), p]. All pairs of all
    patches are counted by one bincount, patch index fastest: neighbouring pairs of a smooth
    region then hit different bins instead of queueing on one.
    """
    b, s, _ = patches.shape
    offsets = glcm_offsets(s)
    lo = patches.amin(dim=(1, 2)).to(torch.int32)
    q = (patches.to(torch.int32) - lo.view(b, 1, 1)).permute(1, 2, 0).contiguous()  # (S, S, B)
    r = int(q.max()) + 1
    # Each pair's bin: ((offset·R + i)·R + j)·B + patch, written straight into one buffer.
    first = q * (r * b) + torch.arange(b, device=q.device, dtype=torch.int32)
    second = q * b
    # skimage rounds (sin, cos)·distance: at 45° and 135°, distances 1 and 2 are the same one-pixel step.
    counted = {}
    for o, (dr, dc, n) in enumerate(offsets):
        if n and (dr, dc) not in counted:
            counted[dr, dc] = o
    keys = torch.empty(b * sum(offsets[o][2] for o in counted.values()), dtype=torch.int32, device=q.device)
    start = 0
    for (dr, dc), o in counted.items():
        r0, r1, c0, c1 = max(0, -dr), min(s, s - dr), max(0, -dc), min(s, s - dc)
        seg = keys[start:start + b * offsets[o][2]].view(r1 - r0, c1 - c0, b)
        torch.add(first[r0:r1, c0:c1], second[r0 + dr:r1 + dr, c0 + dc:c1 + dc], out=seg)
        seg += o * r * r * b
        start += seg.numel()
    counts = torch.bincount(keys, minlength=N_OFFSETS * r * r * b).to(torch.int32).view(N_OFFSETS, r * r, b)
    for o, (dr, dc, n) in enumerate(offsets):
        if n and counted[dr, dc] != o:
            counts[o] = counts[counted[dr, dc]]
    return counts, lo, r


def _pair_totals(patch_size, device):
    """Per-offset divisor of graycomatrix(normed=True): the pair count, 1 where there is no pair."""
    return torch.tensor([max(n, 1) for _, _, n in glcm_offsets(patch_size)], dtype=torch.float64, device=device)


@lru_cache(maxsize=8)
def _total_classes(patch_size):
    """Distinct pair totals (float64), the class of each offset and the offsets per class."""
    totals = _pair_totals(patch_size, "cpu").tolist()
    distinct = sorted(set(totals))
    classes = [distinct.index(t) for t in totals]
    return torch.tensor(distinct, dtype=torch.float64), classes, torch.bincount(torch.tensor(classes))


@lru_cache(maxsize=8)
def _merged_rows(patch_size, device):
    """Rows count·classes + class, grouped by equal float64 value count/total: the rows that are not
    the first (lowest) of their value, and that first row. Any prefix of rows keeps this property."""
    totals = _total_classes(patch_size)[0]
    counts = torch.arange(int(totals.max()) + 1, dtype=torch.float64)
    values = counts[:, None] / totals[None, :]  # graycomatrix's IEEE division
    _, group = torch.unique(values.view(-1), return_inverse=True)
    rows = torch.arange(group.numel())
    first = torch.full((int(group.max()) + 1,), group.numel()).scatter_reduce_(0, group, rows, "amin")[group]
    extra = rows != first
    return rows[extra].to(device), first[extra].to(device)


def _entropy_scores(counts, r, patch_size):
    """skimage `shannon_entropy(normed GLCM)` per patch: base-2 entropy of the histogram of its 65,536 values."""
    b, device = counts.shape[2], counts.device
    totals, classes, class_sizes = _total_classes(patch_size)
    nc = len(totals)
    rows = (int(counts.max()) + 1) * nc
    # Cells per (count, total class): row count·classes + class, column patch. Offsets with equal
    # totals share every value, so they share rows ...
    base = (torch.tensor(classes, device=device, dtype=torch.int32).view(N_OFFSETS, 1, 1) * b
            + torch.arange(b, device=device, dtype=torch.int32))
    per_value = torch.bincount(torch.add(base, counts, alpha=nc * b).view(-1), minlength=rows * b).view(rows, b)
    per_value[:nc] += ((GLCM_LEVELS ** 2 - r * r) * class_sizes).view(-1, 1).to(device)  # cells outside the range
    present = per_value.any(dim=1)  # few rows hold anything: the rest are left out below
    # ... and rows whose count/total are equal floats are merged into the first of them.
    extra, first = _merged_rows(patch_size, device)
    keep = int(torch.searchsorted(extra, rows))
    extra, first = extra[:keep], first[:keep]
    merge = present[extra]
    extra, first = extra[merge], first[merge]
    if len(extra):
        per_value.index_add_(0, first, per_value.index_select(0, extra))  # extras are never first
        present[first], present[extra] = True, False
    # scipy.stats.entropy of the value counts: Σ -p·ln p / ln 2, p = n / 65,536.
    p = per_value.index_select(0, present.nonzero().squeeze(1)).to(torch.float64).div_(N_CELLS)
    return torch.special.entr(p).sum(0) / math.log(2)


def _sequential_sum(x, loop=None):
    """Sum over the first axis strictly in order: numpy's order for `sum(P, axis=(0, 1))` of a GLCM.

    The order matters: graycoprops values are rounded to 4 decimals, and exact ties (a contrast of
    0.00625, say) go either way with the last bit. numpy reduces an outer axis in order; on the GPU
    a loop over the axis keeps the order.
    """
    if loop is None:
        loop = x.device.type != "cpu"
    if not loop:
        return torch.from_numpy(np.add.reduce(x.numpy(), axis=0))
    acc = x[0].clone()
    for k in range(1, x.shape[0]):
        acc += x[k]
    return acc


def prop_values(counts, lo, r, prop, patch_size=64, loop=None):
    """skimage `graycoprops(graycomatrix(..., normed=True), prop)` of glcm_counts' batch -> (B, 16), bit for bit.

    Sums run over the kept cells in skimage's order; the cells left out are zero and add nothing.
    """
    seqsum = partial(_sequential_sum, loop=loop)
    totals = _pair_totals(patch_size, counts.device)
    # Layout (cells, B, 16), contiguous, so that numpy sums the cells axis in order.
    p = counts.permute(1, 2, 0).to(torch.float64, memory_format=torch.contiguous_format)
    p /= totals  # graycomatrix(normed=True)
    total = seqsum(p)  # graycoprops normalises once more (the sum is not always exactly 1), 0 read as 1
    p /= torch.where(total == 0, torch.ones_like(total), total)
    cell = torch.arange(r * r, device=counts.device, dtype=torch.float64).view(-1, 1, 1)
    diff = torch.div(cell, r, rounding_mode="floor") - cell % r  # i - j, whatever the lowest level
    if prop == "contrast":
        return seqsum(p * (diff * diff))
    if prop == "dissimilarity":
        return seqsum(p * diff.abs())
    if prop == "homogeneity":
        return seqsum(p * (1.0 / (1.0 + diff * diff)))
    if prop in ("ASM", "energy"):
        asm = seqsum(p * p)
        return asm if prop == "ASM" else torch.sqrt(asm)
    if prop == "correlation":
        i = lo.to(torch.float64).view(1, -1, 1) + torch.div(cell, r, rounding_mode="floor")
        j = lo.to(torch.float64).view(1, -1, 1) + cell % r
        di, dj = i - seqsum(p * i), j - seqsum(p * j)
        std_i, std_j = torch.sqrt(seqsum(p * (di * di))), torch.sqrt(seqsum(p * (dj * dj)))
        cov = seqsum(p * (di * dj))
        flat = (std_i < 1e-15) | (std_j < 1e-15)  # skimage: correlation 1 where a std is ~0
        return torch.where(flat, torch.ones_like(cov), cov / torch.where(flat, torch.ones_like(cov), std_i * std_j))
    raise ValueError(f"unknown GLCM property {prop!r}; choose one of {', '.join(GLCM_PROPS)}")


#################################################################################
#                 GLCM entropy on the CPU: a compiled kernel                    #
#################################################################################

COPIES = 4  # counters per GLCM cell: neighbouring pairs of a smooth region then do not wait on one counter


@lru_cache(maxsize=8)
def _entropy_tables(patch_size):
    """The kernel's constants: per distinct (row, col) step its pair-total class and multiplicity (skimage's
    45° and 135° distances 1 and 2 are one step); per (class, count) the id of the float64 value count/total,
    equal floats sharing one id (64/4032 == 63/3969), id 0 being 0.0; and the number of ids."""
    offsets = glcm_offsets(patch_size)
    totals = sorted({max(n, 1) for _, _, n in offsets})
    values = np.concatenate([np.arange(t + 1) / np.float64(t) for t in totals])  # graycomatrix's IEEE division
    _, ids = np.unique(values, return_inverse=True)
    table = np.full((len(totals), max(totals) + 1), -1, np.int64)
    for k, t in enumerate(totals):
        table[k, :t + 1] = ids[sum(u + 1 for u in totals[:k]):][:t + 1]
    steps = {}
    for dr, dc, n in offsets:
        if n:  # an offset without pairs holds only zeros, which the kernel counts from the total
            steps.setdefault((dr, dc), [dr, dc, totals.index(n), 0])[3] += 1
    return np.array(list(steps.values()), np.int64).reshape(-1, 4), table, int(ids.max()) + 1


@numba.njit(cache=True, nogil=True)
def _entropy_kernel(grey, patch_size, steps, table, n_ids):
    """shannon_entropy of each full patch's normed GLCM, row-major: per patch, counts of the levels from its lowest
    (R levels), the non-zero cells compacted without branches, then the histogram of their values; the cells
    left (N_CELLS minus the non-zero ones) are 0.0. Indices are unsigned: numba then skips its negative-index
    checks, which cost more than the counting."""
    u = np.uint64
    n_steps, rows, cols = steps.shape[0], grey.shape[0] // patch_size, grey.shape[1] // patch_size
    block = GLCM_LEVELS * GLCM_LEVELS * COPIES
    counts = np.zeros(n_steps * block, np.uint16)  # at most 4096 / COPIES pairs per counter
    q = np.empty(patch_size * patch_size, np.uint64)
    q_row = np.empty(patch_size * patch_size, np.uint64)
    nonzero, nonzero_step = np.empty(n_steps * block, np.int64), np.empty(n_steps * block, np.int64)
    hist, used = np.zeros(n_ids, np.int64), np.empty(n_steps * block + 1, np.int64)
    scores = np.zeros(rows * cols)
    for patch in range(rows * cols):
        y0, x0 = (patch // cols) * patch_size, (patch % cols) * patch_size
        lo, hi = u(255), u(0)
        for y in range(patch_size):
            for x in range(patch_size):
                level = u(grey[u(y0 + y), u(x0 + x)])
                q[u(y * patch_size + x)] = level
                lo, hi = min(lo, level), max(hi, level)
        r = hi - lo + u(1)
        for i in range(patch_size * patch_size):
            q[u(i)] -= lo
            q_row[u(i)] = q[u(i)] * r * u(COPIES)
        # Count: pair (i, j) of step s goes to counter s·block + (i·R + j)·COPIES + x % COPIES.
        for s in range(n_steps):
            dr, dc, base = steps[s, 0], steps[s, 1], u(s * block)
            x_start, x_stop = u(max(0, -dc)), u(min(patch_size, patch_size - dc))
            for y in range(max(0, -dr), min(patch_size, patch_size - dr)):
                a, b = u(y * patch_size), u((y + dr) * patch_size + dc)
                x = x_start
                while x + u(COPIES - 1) < x_stop:
                    for k in range(COPIES):
                        counts[base + q_row[a + x + u(k)] + q[b + x + u(k)] * u(COPIES) + u(k)] += 1
                    x += u(COPIES)
                while x < x_stop:
                    counts[base + q_row[a + x] + q[b + x] * u(COPIES)] += 1
                    x += u(1)
        # Compact the non-zero cells (no branch: a cell is written, and kept only if non-zero), reset the counters.
        n_nonzero = 0
        for s in range(n_steps):
            base = u(s * block)
            for cell in range(r * r):
                c = base + u(cell) * u(COPIES)
                n = np.int64(counts[c]) + counts[c + u(1)] + counts[c + u(2)] + counts[c + u(3)]
                nonzero[n_nonzero], nonzero_step[n_nonzero] = n, s
                n_nonzero += n != 0
            counts[base:base + r * r * u(COPIES)] = 0
        # Histogram of the values count/total, then scipy's entropy of it in bits.
        zeros, n_used = N_CELLS, 0
        for t in range(n_nonzero):
            s = nonzero_step[t]
            v = table[steps[s, 2], nonzero[t]]
            if hist[v] == 0:
                used[n_used] = v
                n_used += 1
            hist[v] += steps[s, 3]
            zeros -= steps[s, 3]
        entropy = 0.0 if zeros == 0 else -(zeros / N_CELLS) * np.log(zeros / N_CELLS)
        for t in range(n_used):
            p = hist[used[t]] / N_CELLS
            entropy -= p * np.log(p)
            hist[used[t]] = 0
        scores[patch] = entropy / np.log(2.0)
    return scores


@numba.njit(cache=True, nogil=True)
def _grey64_kernel(rgb):
    """grey64 of a uint8 H×W×3 array on the CPU, compiled (torch's int32 tensors cost more than the GLCM)."""
    flat, out = rgb.reshape(-1), np.empty(rgb.shape[0] * rgb.shape[1], np.uint8)
    for i in range(out.shape[0]):
        j = np.uint64(3 * i)
        y = 9798 * np.uint32(flat[j]) + 19235 * np.uint32(flat[j + 1]) + 3735 * np.uint32(flat[j + 2]) + (1 << 14)
        out[np.uint64(i)] = y >> 17
    return out.reshape(rgb.shape[:2])


def entropy_patch_scores_cpu(grey, patch_size=64):
    """glcm_patch_scores(grey, "entropy") by the compiled kernel: uint8 (H, W) numpy array -> float64 scores."""
    return _entropy_kernel(np.ascontiguousarray(grey, dtype=np.uint8), patch_size, *_entropy_tables(patch_size))


@contextmanager
def _torch_threads(n):
    """Temporarily set torch's CPU thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def glcm_patch_scores(grey, prop="entropy", patch_size=64, chunk=None):
    """64-level grey (H, W) tensor -> float64 numpy score of each full patch, row-major from the top-left."""
    if prop not in GLCM_PROPS:
        raise ValueError(f"unknown GLCM property {prop!r}; choose one of {', '.join(GLCM_PROPS)}")
    if prop == "entropy" and grey.device.type == "cpu":
        return entropy_patch_scores_cpu(grey.numpy(), patch_size)
    h, w = grey.shape[0] // patch_size, grey.shape[1] // patch_size
    scores = np.zeros(h * w)
    # Batches are small: on the CPU, intra-op threads only add synchronisation (3× slower on a busy box).
    with _torch_threads(1) if grey.device.type == "cpu" else nullcontext():
        patches = (grey[:h * patch_size, :w * patch_size].reshape(h, patch_size, w, patch_size)
                   .permute(0, 2, 1, 3).reshape(h * w, patch_size, patch_size))
        # Patches of similar level range go together: each batch counts only its widest range.
        order = torch.argsort(patches.amax(dim=(1, 2)) - patches.amin(dim=(1, 2))).cpu()
        chunk = chunk or (16 if grey.device.type == "cpu" else 1024)  # small batches stay in the CPU cache
        chunk = min(chunk, 2 ** 31 // (N_OFFSETS * GLCM_LEVELS ** 2))  # bins are int32
        for start in range(0, h * w, chunk):
            idx = order[start:start + chunk]
            counts, lo, r = glcm_counts(patches[idx.to(grey.device)])
            if prop == "entropy":
                scores[idx.numpy()] = _entropy_scores(counts, r, patch_size).cpu().numpy()
            else:  # the authors: graycoprops(...).round(4), then the mean over the 4×4 (distance, angle) grid
                values = prop_values(counts, lo, r, prop, patch_size).cpu().numpy().reshape(-1, 4, 4)
                scores[idx.numpy()] = np.round(values, 4).mean(axis=(1, 2))
    return scores


def glcm_score(image, prop="entropy", patch_size=64, device="cpu"):
    """GLCM Score of one image (PIL image, path or uint8 H×W×3 RGB); NaN if it holds no full patch."""
    scores = glcm_patch_scores(grey64(to_rgb8(image), device), prop, patch_size)
    return float(scores.mean()) if len(scores) else float("nan")


#################################################################################
#                               Compression Ratio                               #
#################################################################################

def jpeg_bytes(rgb, quality=95):
    """Size of the in-memory Pillow JPEG of a uint8 RGB array (Pillow defaults besides quality)."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.tell()


def compressed_bytes(image, rgb, mode="encode", quality=95):
    """Bytes the Compression Ratio divides by: an in-memory JPEG ("encode") or the file on disk ("file")."""
    if mode == "encode":
        return jpeg_bytes(rgb, quality)
    if mode == "file":
        if not isinstance(image, (str, os.PathLike)):
            raise ValueError("cr_mode='file' measures files on disk: pass paths, not images")
        return os.path.getsize(image)
    raise ValueError(f"unknown compression-ratio mode {mode!r}; choose 'encode' or 'file'")


def compression_ratio(images, mode="encode", quality=95):
    """Σ raw RGB bytes (H·W·3) / Σ compressed bytes over `images` (paths or PIL images)."""
    raw = compressed = 0
    for image in images:
        rgb = to_rgb8(image)
        raw += rgb.size
        compressed += compressed_bytes(image, rgb, mode, quality)
    if compressed == 0:
        raise ValueError("compression_ratio needs at least one image")
    return raw / compressed


#################################################################################
#                                 Folder level                                  #
#################################################################################

def list_files(img_root, recursive=False):
    """Sorted non-hidden files of `img_root` (and its sub-folders with `recursive`)."""
    if not os.path.isdir(img_root):
        raise UsageError(f"--img_root {img_root!r} is not a folder")
    if recursive:
        found = [os.path.join(d, f) for d, subdirs, files in os.walk(img_root) for f in files]
    else:
        found = [os.path.join(img_root, f) for f in os.listdir(img_root)]
    found = sorted(f for f in found if os.path.isfile(f) and not os.path.basename(f).startswith(".")
                   and not f.lower().endswith(NOT_IMAGES))
    if not found:
        hint = "" if recursive else " (add --recursive to look into sub-folders)"
        raise UsageError(f"no files in {img_root!r}{hint}: point --img_root at a folder of images")
    return found


def measure_image(path, prop="entropy", patch_size=64, cr_mode="encode", quality=95, glcm_device="cpu"):
    """One file -> its CSV row, or {"error": ...}; with glcm_device None the row carries the grey levels instead."""
    try:
        rgb = to_rgb8(path)
    except Exception as err:  # Pillow's decoders raise many types on corrupt or non-image files
        return {"file": path, "error": f"{type(err).__name__}: {err}"}
    raw, compressed = rgb.size, compressed_bytes(path, rgb, cr_mode, quality)
    row = {"file": path, "width": rgb.shape[1], "height": rgb.shape[0],
           "n_patches": (rgb.shape[0] // patch_size) * (rgb.shape[1] // patch_size),
           "raw_bytes": raw, "compressed_bytes": compressed, "compression_ratio": raw / compressed}
    if glcm_device is None:
        row["grey64"] = grey64(rgb).numpy()
    else:
        row["glcm"] = glcm_score(rgb, prop, patch_size, glcm_device)
    return row


def _init_worker():
    """One torch thread per worker process: the processes share the cores."""
    torch.set_num_threads(1)


def evaluate_folder(img_root, prop="entropy", patch_size=64, device="cpu", workers=None, cr_mode="encode",
                    quality=95, recursive=False, size=None, progress=True, files=None):
    """GLCM Score and Compression Ratio of a folder (or of `files` in it) -> (summary dict, per-image rows).

    Unreadable files are skipped with a warning and counted (`n_skipped`); images without a full
    patch get GLCM NaN, are left out of the GLCM Score and kept in the Compression Ratio.
    CPU: each worker process reads and scores whole images. GPU: workers read and encode, the
    main process scores on the GPU.
    """
    if prop not in GLCM_PROPS:
        raise ValueError(f"unknown GLCM property {prop!r}; choose one of {', '.join(GLCM_PROPS)}")
    if cr_mode not in ("encode", "file"):
        raise ValueError(f"unknown compression-ratio mode {cr_mode!r}; choose 'encode' or 'file'")
    files = list_files(img_root, recursive) if files is None else [str(f) for f in files]
    on_cpu = torch.device(device).type == "cpu"
    task = partial(measure_image, prop=prop, patch_size=patch_size, cr_mode=cr_mode, quality=quality,
                   glcm_device="cpu" if on_cpu else None)
    workers = max(1, min(workers or os.cpu_count() or 1, len(files)))
    pool = (multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker) if workers > 1
            else nullcontext())
    rows, skipped = [], []
    with pool:
        results = pool.imap(task, files) if workers > 1 else map(task, files)
        for row in tqdm(results, total=len(files), desc="GLCM + CR", unit="img", disable=not progress):
            name = os.path.relpath(row["file"], img_root)
            if "error" in row:
                warnings.warn(f"skipping {row['file']}: not a readable image ({row['error']})", stacklevel=2)
                skipped.append(name)
                continue
            if not on_cpu:
                grey = torch.from_numpy(row.pop("grey64")).to(device)
                scores = glcm_patch_scores(grey, prop, patch_size)
                row["glcm"] = float(scores.mean()) if len(scores) else float("nan")
            if row["n_patches"] == 0:
                warnings.warn(f"{row['file']}: {row['width']}×{row['height']} holds no {patch_size}×{patch_size} "
                              "patch; left out of the GLCM Score, kept in the Compression Ratio", stacklevel=2)
            rows.append({**row, "file": name})
    if not rows:
        raise UsageError(f"none of the {len(files)} files in {img_root!r} could be read as an image")
    if size is not None:
        other = sum((r["width"], r["height"]) != (size, size) for r in rows)
        if other:
            warnings.warn(f"{other} of {len(rows)} images are not {size}×{size}; each is measured at its own "
                          "size (--size only checks)", stacklevel=2)

    # Set level: mean of the image scores; Σ raw / Σ compressed.
    scored = [r["glcm"] for r in rows if not math.isnan(r["glcm"])]
    summary = {
        "glcm_score": float(np.mean(scored)) if scored else float("nan"),
        "compression_ratio": sum(r["raw_bytes"] for r in rows) / sum(r["compressed_bytes"] for r in rows),
        "n_images": len(rows), "n_glcm_images": len(scored), "n_skipped": len(skipped), "skipped": skipped,
        "img_root": str(img_root), "prop": prop, "patch_size": patch_size, "cr_mode": cr_mode,
        "jpeg_quality": quality, "recursive": recursive, "size": size, "device": str(device),
    }
    return summary, rows


def write_outputs(summary, rows, csv_path, json_path):
    """Per-image CSV and JSON summary (NaN written as null in the JSON), each written atomically."""
    outputs.write_csv(csv_path, rows, CSV_FIELDS)
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in summary.items()}
    outputs.write_json(json_path, clean)
