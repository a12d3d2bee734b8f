"""Prepare a 4K dataset in place (docs/data.md): `verify` it, `filter` it by detail, or `make_eval_set` from it.

Reads an imagefolder (metadata.jsonl + images) or a folder of Parquet shards (the Hub's layout), never modifies the
input, works in chunks over --workers processes (and --shard I/N over machines), and resumes from its work folder.

    python prepare_data.py verify DATA_DIR [--out_json DATA_DIR_verify.json]
    python prepare_data.py filter DATA_DIR --out DIR [--min_glcm G] [--min_compression_ratio C] [--max_flat_share F]
                                                     [--min_short_side S] [--keep_duplicates]
    python prepare_data.py make_eval_set DATA_DIR --size {2048,4096} --out DIR [--max_flat_share F] [--keep_duplicates]

What ordinary photos, flat images and noise score: BENCHMARKS.md, "Detail measures of known pictures".
"""
import argparse
import csv
import hashlib
import io
import json
import math
import multiprocessing
import os
import re
import shutil
import statistics
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

import detail_metrics as dm
import outputs
import parquet_shards as ps
from errors import HelpFormatter, UsageError, exit_on_usage_error
from imagefolder import IMAGE_ERRORS, IMAGE_SUFFIXES, REFUSED, json_lines, outside_problem, rows_folder

CHUNK = 16  # images of an imagefolder per unit of work (a Parquet chunk is one row group)
SCORE_FIELDS = ("file", "width", "height", "short_side", "glcm", "compression_ratio", "laplacian_var", "flat_share",
                "passed", "failed")
SHORT_SIDE_BINS = (1024, 2048, 4096)
FLAT_IMAGE = 0.9  # make_eval_set's --max_flat_share: a flat image scores 1, ordinary 4K photos at most 0.6 (BENCHMARKS)
FORMAT_SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif", "GIF": ".gif"}


#################################################################################
#                          Reading either layout in place                       #
#################################################################################

def read_imagefolder(root):
    """(items, orphans, problems) of an imagefolder: one item per metadata line whose file exists, plus one per image
    file no line names (caption missing); orphans: lines whose file is missing."""
    items, orphans, problems, listed, allowed = [], [], [], set(), rows_folder(root)
    with open(root / "metadata.jsonl", encoding="utf-8", errors="replace") as lines:
        for number, entry in json_lines(lines, problems, prefix="metadata.jsonl line"):
            name = entry.get("file_name") if isinstance(entry, dict) else None
            if not isinstance(name, str) or not name.strip():
                problems.append(f"metadata.jsonl line {number}: no 'file_name'")
                continue
            if refused := outside_problem(name, root, allowed):
                problems.append(f"metadata.jsonl line {number}: {refused}")
                continue
            path = root / name
            if not path.is_file():
                orphans.append(name)
                continue
            listed.add(path.resolve())
            text, problem = ps.caption_of(entry.get("text"))
            items.append({"name": name, "path": str(path), "text": text, "caption_problem": problem})
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        if path.resolve() not in listed and not any(part.startswith(".") for part in path.relative_to(root).parts):
            items.append({"name": path.relative_to(root).as_posix(), "path": str(path), "text": None,
                          "caption_problem": "not in metadata.jsonl"})
    return items, orphans, problems


def read_parquet(root, image_column, caption_column):
    """(items, orphans, problems) of a folder of Parquet shards: one item per row of each readable shard."""
    records, problems = ps.list_rows(root, image_column, caption_column)
    items = [{"name": f"{r['parquet_file'].relative_to(root).as_posix()}#{r['row']}",
              "parquet_file": str(r["parquet_file"]),
              "row": r["row"], "text": r["text"], "caption_problem": r.get("caption_problem")} for r in records]
    return items, [], problems


def read_dataset(data_dir, image_column, caption_column):
    """(layout, items, orphans, problems) of DATA_DIR, either layout."""
    root = Path(data_dir)
    if not root.is_dir():
        raise UsageError(f"DATA_DIR {data_dir} is not a folder: pass an imagefolder (metadata.jsonl + images) or a "
                         f"folder of Parquet shards.")
    if (root / "metadata.jsonl").is_file():
        return ("imagefolder", *read_imagefolder(root))
    if ps.find_shards(root):
        return ("parquet", *read_parquet(root, image_column, caption_column))
    raise UsageError(f"DATA_DIR {data_dir} holds neither a metadata.jsonl nor *.parquet shards.")


def make_chunks(layout, items):
    """Units of work with ids that do not change between runs: CHUNK files, or one Parquet row group."""
    if layout == "imagefolder":
        return [{"id": f"files:{k // CHUNK}", "items": items[k:k + CHUNK]} for k in range(0, len(items), CHUNK)]
    chunks, by_shard = [], {}
    for item in items:
        by_shard.setdefault(item["parquet_file"], []).append(item)
    for shard, rows in by_shard.items():
        for group, first, n in ps.row_groups(shard):
            chunks.append({"id": f"{shard}:{group}", "parquet_file": shard, "group": group,
                           "items": [it for it in rows if first <= it["row"] < first + n], "first": first})
    return chunks


#################################################################################
#                                   Measures                                    #
#################################################################################

def luma(rgb):
    """8-bit luma as OpenCV's COLOR_BGR2GRAY on uint8 (the GLCM Score's grey before its 64 levels), int32."""
    r, g, b = (rgb[..., k].astype(np.int32) for k in range(3))
    return (9798 * r + 19235 * g + 3735 * b + (1 << 14)) >> 15


def laplacian_variance(y):
    """Variance of the 4-neighbour Laplacian (0 1 0 / 1 -4 1 / 0 1 0) of the luma over the interior pixels."""
    if min(y.shape) < 3:
        return float("nan")
    lap = y[:-2, 1:-1] + y[2:, 1:-1] + y[1:-1, :-2] + y[1:-1, 2:] - 4 * y[1:-1, 1:-1]
    return float(lap.var(dtype=np.float64))


def flat_share(y, flat_std, patch_size=64):
    """Share of the full patch_size² patches (from the top-left) whose luma standard deviation is below flat_std."""
    h, w = y.shape[0] // patch_size, y.shape[1] // patch_size
    if h * w == 0:
        return float("nan")
    patches = y[:h * patch_size, :w * patch_size].reshape(h, patch_size, w, patch_size).astype(np.float64)
    return float((patches.std(axis=(1, 3)) < flat_std).mean())


def is_flat(row, max_flat_share):
    """Whether an image fails --max_flat_share: more of its 64x64 patches flat than allowed, or none to judge."""
    return not row["flat_share"] <= max_flat_share


def score_image(rgb, flat_std):
    """The detail measures of one image: GLCM Score, Compression Ratio (q95 JPEG), Laplacian variance, flat share."""
    y = luma(rgb)
    return {"glcm": dm.glcm_score(rgb), "compression_ratio": rgb.size / dm.jpeg_bytes(rgb),
            "laplacian_var": laplacian_variance(y), "flat_share": flat_share(y, flat_std)}


def measure(command, encoded, flat_std):
    """One image's result row (decoded with EXIF orientation applied); raises what a bad image raises."""
    with Image.open(io.BytesIO(encoded)) as image:
        image.load()  # a truncated file fails here
        fmt = image.format
        rgb = dm.to_rgb8(image)
    row = {"width": rgb.shape[1], "height": rgb.shape[0], "format": fmt, "sha256": hashlib.sha256(encoded).hexdigest()}
    if command == "filter":
        row.update(score_image(rgb, flat_std))
    elif command == "make_eval_set":
        row["flat_share"] = flat_share(luma(rgb), flat_std)
    return row


def process_chunk(chunk, command, image_column, flat_std):
    """Result rows of one chunk: per item its measures or {"error"}; items without a caption are only verified."""
    rows, cells = [], None
    if "parquet_file" in chunk:
        try:
            cells = ps.row_group_column(chunk["parquet_file"], chunk["group"], image_column)
        except (*ps.SHARD_ERRORS, ValueError) as error:
            reason = f"row group {chunk['group']} unreadable, shard cut short? ({' '.join(str(error).split())[:120]})"
            return [{"name": it["name"], "error": reason} for it in chunk["items"]]
    for item in chunk["items"]:
        row = {"name": item["name"]}
        if command != "verify" and item["text"] is None:
            rows.append({**row, "skipped": item["caption_problem"]})
            continue
        try:
            if cells is None:
                encoded = Path(item["path"]).read_bytes()
            else:
                encoded = ps.image_bytes(cells[item["row"] - chunk["first"]])
            row.update(measure(command, encoded, flat_std))
        except IMAGE_ERRORS as error:
            message = re.sub(r"<_io.BytesIO object at 0x[0-9a-f]+>", "the bytes", " ".join(str(error).split()))
            row["error"] = f"{type(error).__name__}: {message[:160]}"
        rows.append(row)
    return rows


def _run_chunk(job):
    """process_chunk for a pool worker: (chunk id, rows)."""
    chunk, settings = job
    return chunk["id"], process_chunk(chunk, **settings)


#################################################################################
#                     Resumable work: one append-only log per run               #
#################################################################################

def input_inventory(layout, items):
    """[[name, size, mtime_ns]] of every file the chunks read, in input order: an imagefolder's images, or the shards
    of a Parquet folder (what settings.json ties a work folder to)."""
    if layout == "imagefolder":
        files = {item["path"]: item["name"] for item in items}
    else:
        files = {item["parquet_file"]: item["name"].rsplit("#", 1)[0] for item in items}
    return [[name, os.stat(path).st_size, os.stat(path).st_mtime_ns] for path, name in files.items()]


def input_changes(before, now):
    """What differs between two input inventories, as a phrase: files added, removed, changed, or reordered."""
    old, new = ({name: (size, mtime) for name, size, mtime in listing} for listing in (before, now))
    found = {"added": [n for n in new if n not in old], "removed": [n for n in old if n not in new],
             "changed": [n for n in new if n in old and new[n] != old[n]]}
    parts = [f"{len(names)} file(s) {what}, e.g. {names[0]}" for what, names in found.items() if names]
    return "; ".join(parts) or "the same files in another order"


class WorkLog:
    """The finished chunks of a command, in `folder`: one JSON line per chunk, appended and flushed to disk as soon as
    it is done (a torn last line, from a killed run, is ignored and its chunk redone). Each --shard writes its own
    file, so machines sharing the folder never write to one file; `settings.json` ties the folder to its settings
    and to its input (a digest of `inventory`, kept in input.json): a run on changed input is refused."""

    def __init__(self, folder, settings, shard, inventory):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        stamp, listing = self.folder / "settings.json", self.folder / "input.json"
        digest = hashlib.sha256(json.dumps(inventory).encode()).hexdigest()
        settings = {**settings, "input": {"files": len(inventory), "sha256": digest}}
        if stamp.is_file():
            saved = json.loads(stamp.read_text())
            if {k: v for k, v in saved.items() if k != "input"} != {k: v for k, v in settings.items() if k != "input"}:
                raise UsageError(f"{self.folder} holds the work of another input or other settings ({stamp}); use "
                                 f"another output, or pass --overwrite to start afresh there.")
            if saved.get("input") != settings["input"]:
                what = input_changes(json.loads(listing.read_text()), inventory) if listing.is_file() else \
                    "no record of the input it read"
                raise UsageError(f"{settings['data_dir']} changed since the work in {self.folder} began ({what}): "
                                 f"pass --overwrite to start afresh, or use another output.")
        outputs.write_text(listing, json.dumps(inventory))
        outputs.write_text(stamp, json.dumps(settings, indent=2))
        self.path = self.folder / f"results-{shard[0]}-of-{shard[1]}.jsonl"
        if self.path.is_file():  # cut a torn last line off this run's own log, so that appends start on a new line
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):
                with open(self.path, "r+b") as log:
                    log.truncate(data.rfind(b"\n") + 1)
        self.done = {}
        for log in sorted(self.folder.glob("results-*.jsonl")):
            for line in log.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the torn last line of a killed run
                self.done[entry["chunk"]] = entry["rows"]

    @staticmethod
    def discard(folder):
        """Remove the work of earlier runs from `folder` (--overwrite): every shard's log, settings and inventory."""
        for path in [*Path(folder).glob("results-*.jsonl"), Path(folder) / "settings.json",
                     Path(folder) / "input.json"]:
            path.unlink(missing_ok=True)

    def append(self, chunk_id, rows):
        """Record a finished chunk on disk before going on."""
        with open(self.path, "a", encoding="utf-8") as log:
            log.write(json.dumps({"chunk": chunk_id, "rows": rows}) + "\n")
            log.flush()
            os.fsync(log.fileno())
        self.done[chunk_id] = rows




def run_chunks(chunks, log, shard, workers, settings, desc):
    """Process this shard's unfinished chunks over `workers` processes; True when every chunk (all shards) is done."""
    mine = [c for k, c in enumerate(chunks) if k % shard[1] == shard[0] and c["id"] not in log.done]
    jobs = [(c, settings) for c in mine]
    pool = multiprocessing.get_context("spawn").Pool(workers, initializer=dm._init_worker) if workers > 1 else None
    try:
        results = pool.imap_unordered(_run_chunk, jobs) if pool else map(_run_chunk, jobs)
        with tqdm(total=sum(len(c["items"]) for c in mine), desc=desc, unit="img") as bar:
            for chunk_id, rows in results:
                log.append(chunk_id, rows)
                bar.update(len(rows))
    finally:
        if pool:
            pool.close()
            pool.join()
    missing = [c["id"] for c in chunks if c["id"] not in log.done]
    if missing:
        print(f"shard {shard[0]}/{shard[1]} done; {len(missing)} chunks of other shards are not: run again (any "
              f"shard, or without --shard) once they are, to write the outputs from {log.folder}")
    return not missing


def collect(chunks, log):
    """{item name: result row} of every item, in input order."""
    return {row["name"]: row for c in chunks for row in log.done[c["id"]]}


#################################################################################
#                                   Commands                                    #
#################################################################################

def short_side_distribution(sides):
    """min / median / max and counts per range of the short sides."""
    if not sides:
        return {}
    edges = (0, *SHORT_SIDE_BINS, math.inf)
    bins = {f"{lo}-{hi - 1}" if hi != math.inf else f">={lo}": sum(lo <= s < hi for s in sides)
            for lo, hi in zip(edges, edges[1:])}
    return {"min": min(sides), "median": statistics.median(sides), "max": max(sides), "bins": bins}


def duplicate_groups(rows):
    """Names of the rows with the same encoded bytes (sha256), in input order: one list per group of two or more."""
    by_hash = {}
    for row in rows:
        if "sha256" in row:
            by_hash.setdefault(row["sha256"], []).append(row["name"])
    return [group for group in by_hash.values() if len(group) > 1]


def duplicates_to_drop(results, keep_duplicates):
    """{name: the first name with its bytes} of every measured image but the first of each duplicate group (none
    with --keep_duplicates)."""
    if keep_duplicates:
        return {}
    return {name: group[0] for group in duplicate_groups(results.values()) for name in group[1:]}


def refused(problems):
    """How many rows were refused (never read) because their path leaves the dataset folder."""
    return sum(problem.endswith(REFUSED) for problem in problems)


def verify_report(data_dir, layout, items, orphans, problems, results):
    """The verify JSON: counts, the lists of bad files, duplicate groups and the short-side distribution."""
    readable = [r for r in results.values() if "error" not in r]
    corrupt = [f"{r['name']}: {r['error']}" for r in results.values() if "error" in r]
    missing = [f"{it['name']}: {it['caption_problem']}" for it in items if it["text"] is None]
    return {"data_dir": str(data_dir), "layout": layout, "n_images": len(items), "n_readable": len(readable),
            "corrupt": corrupt, "missing_caption": missing, "orphan_captions": orphans,
            "duplicates": duplicate_groups(readable), "n_refused_paths": refused(problems),
            "short_side": short_side_distribution([min(r["width"], r["height"]) for r in readable]),
            "problems": problems + corrupt + missing + [f"{name}: caption whose file is missing" for name in orphans]}


def thresholds_failed(row, args):
    """The thresholds an image fails (a threshold not given is not applied; a NaN GLCM fails --min_glcm)."""
    failed = []
    if args.min_short_side is not None and min(row["width"], row["height"]) < args.min_short_side:
        failed.append("min_short_side")
    if args.min_glcm is not None and not row["glcm"] >= args.min_glcm:
        failed.append("min_glcm")
    if args.min_compression_ratio is not None and row["compression_ratio"] < args.min_compression_ratio:
        failed.append("min_compression_ratio")
    if args.max_flat_share is not None and is_flat(row, args.max_flat_share):
        failed.append("max_flat_share")
    return failed


def pointer(item, out, image_column):
    """A metadata.jsonl line's source for `item`: its file, or its shard, row and image column, relative to `out`."""
    if "parquet_file" in item:
        return {"parquet_file": os.path.relpath(item["parquet_file"], out), "row": item["row"],
                "image_column": image_column}
    return {"file_name": os.path.relpath(item["path"], out)}


def write_filter_outputs(out, items, problems, results, args):
    """DIR/scores.csv (every scored image), DIR/metadata.jsonl (those that pass), DIR/filter_report.json. An exact
    duplicate of an earlier image fails as "duplicate" unless --keep_duplicates."""
    rows, lines, report = [], [], {"n_images": len(items), "n_scored": 0, "n_passed": 0, "failed": {}}
    duplicates = duplicates_to_drop(results, args.keep_duplicates)
    for item in items:
        result = results[item["name"]]
        if "error" in result or "skipped" in result:
            problems.append(f"{item['name']}: {result.get('error') or result['skipped']}")
            continue
        failed = thresholds_failed(result, args)
        if item["name"] in duplicates:
            failed.append("duplicate")
            problems.append(f"{item['name']}: the same bytes as {duplicates[item['name']]}, dropped "
                            f"(--keep_duplicates keeps it)")
        if math.isnan(result["glcm"]):
            problems.append(f"{item['name']}: {result['width']}x{result['height']} is too small for a 64x64 patch "
                            f"(GLCM Score and flat share undefined)")
        rows.append({"file": item["name"], "width": result["width"], "height": result["height"],
                     "short_side": min(result["width"], result["height"]),
                     **{k: result[k] for k in ("glcm", "compression_ratio", "laplacian_var", "flat_share")},
                     "passed": int(not failed), "failed": " ".join(failed)})
        for name in failed:
            report["failed"][name] = report["failed"].get(name, 0) + 1
        if not failed:
            lines.append(json.dumps({**pointer(item, out, args.image_column), "text": item["text"]},
                                    ensure_ascii=False))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SCORE_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    outputs.write_text(out / "scores.csv", buffer.getvalue())
    outputs.write_text(out / "metadata.jsonl", "".join(line + "\n" for line in lines))
    report.update(n_scored=len(rows), n_passed=len(lines), n_duplicates=len(duplicates),
                  n_refused_paths=refused(problems), problems=problems,
                  thresholds={k: getattr(args, k) for k in ("min_glcm", "min_compression_ratio", "max_flat_share",
                                                            "min_short_side", "keep_duplicates")})
    outputs.write_text(out / "filter_report.json", json.dumps(report, indent=2))
    return report


def copy_eval_image(item, result, image_column, target):
    """The original bytes of an eval image at `target` (skipped when already there), written then renamed."""
    if target.is_file():
        return
    tmp = target.with_name(f".{target.name}.tmp")
    if "parquet_file" in item:
        tmp.write_bytes(ps.read_row_image_bytes(item["parquet_file"], item["row"], image_column))
    else:
        shutil.copyfile(item["path"], tmp)
    os.replace(tmp, target)


def write_eval_set(out, items, problems, results, args):
    """DIR/images/NNNNN.ext (the originals' bytes), DIR/metadata.jsonl, DIR/eval_set_report.json. Flat images
    (filter's --max_flat_share rule) and exact duplicates of an earlier image are left out unless the flags say not
    to."""
    (out / "images").mkdir(exist_ok=True)
    lines, too_small, flat, duplicate = [], 0, 0, 0
    duplicates = duplicates_to_drop(results, args.keep_duplicates)
    for item in items:
        result = results[item["name"]]
        if "error" in result or "skipped" in result:
            problems.append(f"{item['name']}: {result.get('error') or result['skipped']}")
            continue
        if min(result["width"], result["height"]) <= args.size:
            too_small += 1
            problems.append(f"{item['name']}: {result['width']}x{result['height']}, short side not above {args.size}")
            continue
        if item["name"] in duplicates:
            duplicate += 1
            problems.append(f"{item['name']}: the same bytes as {duplicates[item['name']]}, left out "
                            f"(--keep_duplicates keeps it)")
            continue
        if is_flat(result, args.max_flat_share):
            flat += 1
            problems.append(f"{item['name']}: flat share {result['flat_share']:.2f} above --max_flat_share "
                            f"{args.max_flat_share}, left out (--max_flat_share 1 keeps it)")
            continue
        target = out / "images" / f"{len(lines):05d}{FORMAT_SUFFIX.get(result['format'], '.img')}"
        copy_eval_image(item, result, args.image_column, target)
        lines.append(json.dumps({"file_name": target.relative_to(out).as_posix(), "text": item["text"],
                                 "source": item["name"]}, ensure_ascii=False))
    outputs.write_text(out / "metadata.jsonl", "".join(line + "\n" for line in lines))
    report = {"size": args.size, "n_images": len(items), "n_selected": len(lines), "n_too_small": too_small,
              "n_duplicates": duplicate, "n_flat": flat, "max_flat_share": args.max_flat_share,
              "keep_duplicates": args.keep_duplicates, "n_refused_paths": refused(problems), "problems": problems}
    outputs.write_text(out / "eval_set_report.json", json.dumps(report, indent=2))
    return report


def main(args):
    """Read DATA_DIR, process this shard's unfinished chunks, then (once every chunk is done) write the outputs."""
    data_dir = Path(args.data_dir).resolve()
    layout, items, orphans, problems = read_dataset(data_dir, args.image_column, args.caption_column)
    if args.command == "verify":
        out_json = Path(args.out_json or f"{str(data_dir).rstrip('/')}_verify.json")
        work = Path(f"{out_json}.parts")
    else:
        out = Path(args.out).resolve()
        if out == data_dir or data_dir in out.parents:
            raise UsageError(f"--out {args.out} is inside DATA_DIR: the input is never written to; pick another "
                             f"folder.")
        work = out / ".prepare"
    index, count = args.shard
    label = "--out_json" if args.command == "verify" else "--out"
    with outputs.FolderLock(work, label, name=f".run-{index}-of-{count}.lock"):  # one run per shard of an output
        if args.overwrite:
            WorkLog.discard(work)
            if args.command == "make_eval_set":  # images already there are kept by a resumed run: not these
                shutil.rmtree(out / "images", ignore_errors=True)
        return run(args, data_dir, (layout, items, orphans, problems), work,
                   out_json if args.command == "verify" else out)


def run(args, data_dir, dataset, work, out):
    """Process this shard's unfinished chunks, then (once every chunk is done) write the command's outputs (`out`:
    verify's JSON file, or the output folder)."""
    layout, items, orphans, problems = dataset
    settings = {"command": args.command, "data_dir": str(data_dir), "image_column": args.image_column,
                "flat_std": args.flat_std}
    log = WorkLog(work, settings, args.shard, input_inventory(layout, items))
    chunks = make_chunks(layout, items)
    job = {"command": args.command, "image_column": args.image_column, "flat_std": args.flat_std}
    if not run_chunks(chunks, log, args.shard, args.workers, job, args.command):
        return None
    results = collect(chunks, log)
    if args.command == "verify":
        report = verify_report(data_dir, layout, items, orphans, problems, results)
        outputs.write_text(out, json.dumps(report, indent=2))
        print(f"{report['n_readable']} of {report['n_images']} images readable, {len(report['corrupt'])} corrupt, "
              f"{len(report['missing_caption'])} without caption, {len(orphans)} orphan captions, "
              f"{len(report['duplicates'])} duplicate groups: {out}")
    elif args.command == "filter":
        report = write_filter_outputs(out, items, problems, results, args)
        print(f"{report['n_passed']} of {report['n_scored']} scored images pass (exact duplicates dropped: "
              f"{report['n_duplicates']}; problems: {len(report['problems'])}): {out / 'metadata.jsonl'}")
    else:
        report = write_eval_set(out, items, problems, results, args)
        print(f"{report['n_selected']} images with a short side above {args.size} (left out: flat {report['n_flat']}, "
              f"exact duplicates {report['n_duplicates']}): {out / 'metadata.jsonl'}")
    return report


def parse_shard(value):
    """--shard I/N -> (I, N), 0 <= I < N."""
    try:
        index, count = (int(v) for v in value.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N such as 0/4, got {value!r}") from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"I must be in 0..N-1, got {value!r}")
    return index, count


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("data_dir", help="imagefolder (metadata.jsonl + images) or folder of Parquet shards")
    common.add_argument("--image_column", default=ps.IMAGE_COLUMN, help="Parquet: the image column")
    common.add_argument("--caption_column", default=ps.CAPTION_COLUMN, help="Parquet: the caption column")
    common.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes")
    common.add_argument("--shard", type=parse_shard, default="0/1", help="I/N: this machine's share (0-based)")
    common.add_argument("--flat_std", type=float, default=2.0,
                        help="a 64x64 patch is flat when its 8-bit luma standard deviation is below this")
    common.add_argument("--overwrite", action="store_true",
                        help="discard the earlier work kept for this output (every shard's) and start afresh")
    verify = commands.add_parser("verify", parents=[common], formatter_class=HelpFormatter,
                                 help="decode every image, check captions, duplicates")
    verify.add_argument("--out_json", default=None, help="default: DATA_DIR_verify.json")
    filt = commands.add_parser("filter", parents=[common], formatter_class=HelpFormatter,
                               help="score every image; metadata.jsonl of those passing")
    filt.add_argument("--out", required=True, help="folder for scores.csv, metadata.jsonl, filter_report.json")
    filt.add_argument("--min_glcm", type=float, default=None,
                      help="the least GLCM Score kept (ordinary photos upscaled to 4K: 0.06-0.52, flat images under "
                           "0.03: BENCHMARKS.md); default: not applied")
    filt.add_argument("--min_compression_ratio", type=float, default=None, help="default: not applied")
    filt.add_argument("--max_flat_share", type=float, default=None,
                      help="the largest share of flat 64x64 patches kept (a flat image: 1); default: not applied")
    filt.add_argument("--min_short_side", type=int, default=None, help="default: not applied")
    filt.add_argument("--keep_duplicates", action="store_true",
                      help="keep every copy of an image (off: exact duplicates after the first are dropped)")
    evalset = commands.add_parser("make_eval_set", parents=[common], formatter_class=HelpFormatter,
                                  help="Aesthetic-Eval@size: short side > size, flat images and duplicates left out")
    evalset.add_argument("--size", type=int, choices=[2048, 4096], required=True)
    evalset.add_argument("--out", required=True, help="folder for images/, metadata.jsonl, eval_set_report.json")
    evalset.add_argument("--max_flat_share", type=float, default=FLAT_IMAGE,
                         help="leave out images with a larger share of flat 64x64 patches (filter's rule); 1 keeps "
                              "every image")
    evalset.add_argument("--keep_duplicates", action="store_true",
                         help="keep every copy of an image (off: exact duplicates after the first are left out)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    return args


if __name__ == "__main__":
    exit_on_usage_error("prepare_data.py", main, parse_args())
