"""Building a study: two runs' images paired by file name (or patches cut at native resolution and measured as eval.py
measures images), every image decoded and hashed, gold and repeated items, and each rater's tasks: their order, sides
and repeats, all seeded (PROTOCOL.md §12)."""
import hashlib
import io
import os
import sys
import time
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter
from tqdm import tqdm

import outputs
from errors import UsageError
from human_eval import store
from imagefolder import IMAGE_ERRORS, json_lines, list_folder_images

BLUR_FRACTION = 0.02  # gold: a Gaussian blur of radius 2 % of the longer side (at least 4 px); no fine detail survives
GOLD_LABEL = "blurred"  # the label of a gold item's blurred copy
DEFAULT_GOLD_MIN_PASS = 0.8
MEDIA_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "BMP": "image/bmp",
               "GIF": "image/gif"}  # what every browser shows


#################################################################################
#                                Reading images                                 #
#################################################################################

def check_image(path, flag):
    """{"sha256", "bytes", "width", "height", "media_type"} of an image file, decoded in full; UsageError naming it (and
    `flag`) when it is missing, unreadable, or a format browsers cannot show."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise UsageError(f"{flag}: cannot read {path} ({error.strerror or error})") from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            width, height, kind = image.width, image.height, image.format
    except IMAGE_ERRORS as error:
        raise UsageError(f"{flag}: {path} is not a readable image ({type(error).__name__}: {error}); replace or "
                         f"remove it") from None
    if kind not in MEDIA_TYPES:
        raise UsageError(f"{flag}: {path} is {kind}, which browsers cannot show; convert it to PNG")
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "width": width, "height": height,
            "media_type": MEDIA_TYPES[kind]}


def insert_image(conn, path, label, flag, stored_path=None):
    """check_image, then store it; its id."""
    info = check_image(path, flag)
    return store.add_image(conn, stored_path or Path(path).resolve(), info["sha256"], info["bytes"], info["width"],
                           info["height"], info["media_type"], label)


def read_prompts(folders, prompts_file):
    """({file name: prompt}, where from): the folders' per_image.csv (`file`, `prompt`: generate_and_eval_fid.py's),
    else --prompts (a metadata.jsonl: `file_name`, `text`), else ({}, None)."""
    for folder in folders:
        rows = outputs.read_csv_rows(Path(folder) / "per_image.csv")
        if rows and "prompt" in rows[0]:
            return {Path(r["file"]).name: r["prompt"] for r in rows}, str(Path(folder) / "per_image.csv")
    if prompts_file is None:
        return {}, None
    problems, prompts = [], {}
    try:
        with open(prompts_file, encoding="utf-8") as lines:
            for number, entry in json_lines(lines, problems):
                if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str) or \
                        not isinstance(entry.get("text"), str):
                    problems.append(f"line {number}: needs 'file_name' and 'text'")
                    continue
                prompts[Path(entry["file_name"]).name] = entry["text"]
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"--prompts {prompts_file}: cannot read it ({error})") from None
    if problems:
        raise UsageError(f"--prompts {prompts_file}: {problems[0]} ({len(problems)} bad line(s)); fix the file")
    return prompts, str(prompts_file)


#################################################################################
#                                Creating a study                               #
#################################################################################

def new_study(out):
    """The --out folder, checked: a folder that does not hold a study yet."""
    out = outputs.make_writable_folder(out, "--out")
    if (out / store.DB_NAME).exists():
        raise UsageError(f"--out {out} already holds a study ({store.DB_NAME}); choose another --out")
    return out


def write_study(out, fill, meta):
    """Build the database in a temporary file (fill(conn) inserts images and items), then rename it into place: a
    failed or killed create leaves no study behind."""
    partial = out / f"{store.DB_NAME}.partial"
    partial.unlink(missing_ok=True)
    conn = store.create_database(partial)
    try:
        with store.transaction(conn):
            fill(conn)
            store.write_meta(conn, meta)
    finally:
        conn.close()
    os.replace(partial, out / store.DB_NAME)
    os.chmod(out / store.DB_NAME, 0o600)  # it holds the raters' tokens
    store.connect(out).close()  # switch it to WAL


def pair_folders(folders):
    """(sorted names in both folders, [{name: path}, {name: path}], names in one folder only)."""
    images = []
    for folder in folders:
        if not Path(folder).is_dir():
            raise UsageError(f"--folders {folder!r} is not a folder")
        found = list_folder_images(folder)
        if not found:
            raise UsageError(f"--folders {folder!r} holds no images")
        images.append(found)
    names = sorted(set(images[0]) & set(images[1]))
    if not names:
        raise UsageError("no image file name is in both --folders: a pairwise study needs two runs made from the "
                         "same prompts and seeds (images paired by file name, as compare.py pairs them)")
    return names, images, sorted(set(images[0]) ^ set(images[1]))


def blurred_copy(path, out):
    """Write a heavily blurred PNG copy of an image into `out`; its path."""
    with Image.open(path) as image:
        image = image.convert("RGB")
    radius = max(4.0, BLUR_FRACTION * max(image.size))
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{Path(path).stem}.png"
    image.filter(ImageFilter.GaussianBlur(radius)).save(target)
    return target


def create_pairwise(out, folders, labels, questions, prompts_file=None, gold=0.0, gold_min_pass=DEFAULT_GOLD_MIN_PASS,
                    repeat=0.0, tasks_per_rater=None, seed=0):
    """A pairwise study of two runs in `out`; returns its meta."""
    out = new_study(out)
    names, images, unpaired = pair_folders(folders)
    prompts, prompts_from = read_prompts(folders, prompts_file)
    if prompts:
        missing = [name for name in names if name not in prompts]
        if missing:
            raise UsageError(f"{prompts_from} has no prompt for {missing[0]} ({len(missing)} of {len(names)} images); "
                             f"give every image its prompt")
    elif "prompt_adherence" in questions:
        if questions == ["prompt_adherence"]:
            raise UsageError("--questions prompt_adherence needs prompts: a per_image.csv in the folders or --prompts")
        questions = [q for q in questions if q != "prompt_adherence"]
        print("no prompts (no per_image.csv, no --prompts): the prompt_adherence question is left out",
              file=sys.stderr)
    if unpaired:
        print(f"{len(unpaired)} image(s) in one folder only, left out (e.g. {unpaired[0]})", file=sys.stderr)
    rng = np.random.default_rng(seed)
    n_gold = round(gold * len(names))
    gold_picks = [(names[i], int(rng.integers(2))) for i in sorted(rng.choice(len(names), n_gold, replace=False))]

    def fill(conn):
        ids = {}
        for name in tqdm(names, desc="checking images", unit="pair"):
            ids[name] = [insert_image(conn, images[k][name], labels[k], "--folders") for k in range(2)]
            store.add_item(conn, "pairwise", name, prompts.get(name), *ids[name])
        for name, side in gold_picks:  # an image against its heavy blur: who cannot tell is not looking
            copy = blurred_copy(images[side][name], out / "gold" / labels[side])
            blurred = insert_image(conn, copy, GOLD_LABEL, "--gold", stored_path=copy.relative_to(out))
            store.add_item(conn, "pairwise", name, prompts.get(name), ids[name][side], blurred, gold=True)

    meta = {"kind": "pairwise", "labels": list(labels), "folders": [str(Path(f).resolve()) for f in folders],
            "questions": list(questions), "prompts_from": prompts_from, "seed": seed, "gold": gold, "n_gold": n_gold,
            "gold_min_pass": gold_min_pass, "gold_questions": gold_questions(questions), "blur_fraction": BLUR_FRACTION,
            "repeat": repeat, "tasks_per_rater": tasks_per_rater, "n_items": len(names),
            "created_at": store.iso_time(time.time())}
    write_study(out, fill, meta)
    return meta


def gold_questions(questions):
    """The questions a gold item is judged on: the blur decides aesthetics and fine details, not prompt adherence."""
    return [q for q in questions if q != "prompt_adherence"] or list(questions)


def patch_corners(name, width, height, size, count, seed):
    """`count` top-left corners of size × size patches inside a width × height image, seeded by the file name: the
    same places in every folder's image of that name (when the sizes agree)."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])
    return [(int(rng.integers(0, width - size + 1)), int(rng.integers(0, height - size + 1))) for _ in range(count)]


def create_patches(out, folders, labels, patch_size, patches_per_image, repeat=0.0, tasks_per_rater=None, seed=0,
                   workers=None):
    """A patch-rating study (the paper's Table 1) of one or more folders in `out`; returns its meta. Each patch's GLCM
    Score and Compression Ratio come from detail_metrics.evaluate_folder, eval.py's own function."""
    import detail_metrics  # torch: only this sub-command needs it

    out = new_study(out)
    patches, made = out / "patches", []
    patches.mkdir(exist_ok=True)
    for k, (folder, label) in enumerate(zip(folders, labels)):
        if not Path(folder).is_dir():
            raise UsageError(f"--folders {folder!r} is not a folder")
        found = list_folder_images(folder)
        if not found:
            raise UsageError(f"--folders {folder!r} holds no images")
        for name, path in tqdm(found.items(), desc=f"patches of {label}", unit="img"):
            check_image(path, "--folders")
            rgb = detail_metrics.to_rgb8(path)  # as eval.py reads it: 8-bit RGB, EXIF orientation applied
            height, width = rgb.shape[:2]
            if min(width, height) < patch_size:
                raise UsageError(f"--folders: {path} is {width}×{height}, smaller than --patch_size {patch_size}; "
                                 f"choose a smaller --patch_size")
            for j, (x, y) in enumerate(patch_corners(name, width, height, patch_size, patches_per_image, seed)):
                file = patches / f"{k}-{Path(name).stem}-{j}.png"
                Image.fromarray(rgb[y:y + patch_size, x:x + patch_size]).save(file)
                made.append({"file": file.name, "label": label, "source": str(Path(path).resolve()), "x": x, "y": y})
    _, rows = detail_metrics.evaluate_folder(str(patches), workers=workers)
    measured = {row["file"]: row for row in rows}

    def fill(conn):
        for patch in made:
            row = measured[patch["file"]]
            image = insert_image(conn, patches / patch["file"], patch["label"], "--folders",
                                 stored_path=Path("patches") / patch["file"])
            store.add_item(conn, "patch", patch["file"], None, image, source=patch["source"], x=patch["x"],
                           y=patch["y"], glcm_score=row["glcm"], raw_bytes=row["raw_bytes"],
                           compressed_bytes=row["compressed_bytes"])

    meta = {"kind": "patches", "labels": list(labels), "folders": [str(Path(f).resolve()) for f in folders],
            "questions": [store.RATING_QUESTION], "patch_size": patch_size, "patches_per_image": patches_per_image,
            "seed": seed, "gold": 0.0, "n_gold": 0, "repeat": repeat, "tasks_per_rater": tasks_per_rater,
            "n_items": len(made), "created_at": store.iso_time(time.time())}
    write_study(out, fill, meta)
    return meta
