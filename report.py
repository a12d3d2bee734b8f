"""report.html of compare.py: one static page (no network, no server) to look at runs side by side.

The summary table with intervals and significance marks; then, per prompt, every folder's thumbnail with its
per-image metrics, two 1:1 crops around the highest- and lowest-GLCM 64² patch of the first folder's image (the same
region in every folder), and a zoom view per folder. A click on any thumbnail loads the original images (relative
paths) into the zoom views of that prompt, at 1:1 pixels, centred on the same point in every column.

Every thumbnail and crop is its own <img>, all on the one page, but their pixels live in sprite files (sprites/, a JPEG
of thumbnails and a PNG of crops per 20 prompts): a browser's cost grows with the number of distinct files it loads,
and the page of 2,000 prompts × 3 folders opens from 200 sprites where it did not from 18,000 files (BENCHMARKS.md).
"""
import html
import multiprocessing
import os
import shutil
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from urllib.parse import quote

import numpy as np
from PIL import Image
from tqdm import tqdm

from detail_metrics import glcm_patch_scores, grey64, to_rgb8

GLCM_PATCH = 64
PROMPTS_PER_SPRITE = 20  # prompts per sprite file (a row each)
STYLE = """
body{font-family:sans-serif;margin:16px;background:#fafafa;color:#222}
table{border-collapse:collapse;margin:8px 0 16px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#eee}td.l{text-align:left}.sig{color:#b00;font-weight:bold}.ns{color:#888}
.prompt{border-top:2px solid #ccc;margin-top:18px;padding-top:6px}
.row{display:flex;gap:14px;flex-wrap:wrap}.col{width:%(column)dpx}
.col img.thumb{cursor:crosshair;display:block}
img.thumb,img.crop{object-fit:none}.m{font-size:12px;color:#444}
.crops img{margin:2px 2px 0 0;border:1px solid #999}
.zoom{position:relative;overflow:hidden;width:%(crop)dpx;height:%(crop)dpx;border:1px solid #444;background:#ddd}
.zoom img{position:absolute;left:0;top:0;max-width:none;image-rendering:pixelated}
"""
SCRIPT = """
document.querySelectorAll('img.thumb').forEach(function (thumb) {
  thumb.addEventListener('click', function (event) {
    var rect = thumb.getBoundingClientRect();
    var fx = (event.clientX - rect.left) / rect.width, fy = (event.clientY - rect.top) / rect.height;
    thumb.closest('.prompt').querySelectorAll('.col').forEach(function (col) {
      var t = col.querySelector('img.thumb'), zoom = col.querySelector('.zoom'), img = zoom.querySelector('img');
      var w = +t.dataset.w, h = +t.dataset.h, half = zoom.clientWidth / 2;
      var x = Math.round(fx * w), y = Math.round(fy * h);
      if (img.getAttribute('src') !== t.dataset.full) { img.src = t.dataset.full; }
      img.style.left = (half - x) + 'px'; img.style.top = (half - y) + 'px';
      zoom.dataset.x = x; zoom.dataset.y = y;
    });
  });
});
"""


#################################################################################
#                                  Image files                                  #
#################################################################################

def glcm_extremes(path):
    """((x, y) of the highest-GLCM 64² patch, (x, y) of the lowest), top-left corners, of an image file."""
    rgb = to_rgb8(path)
    scores = glcm_patch_scores(grey64(rgb))
    if not len(scores):
        return (0, 0), (0, 0)
    per_row = rgb.shape[1] // GLCM_PATCH
    corner = lambda k: ((k % per_row) * GLCM_PATCH, (k // per_row) * GLCM_PATCH)  # noqa: E731  row-major patches
    return corner(int(np.argmax(scores))), corner(int(np.argmin(scores)))


def crop_box(width, height, x, y, crop):
    """A crop × crop box centred on the 64² patch at (x, y), kept inside the image."""
    left = min(max(x + GLCM_PATCH // 2 - crop // 2, 0), max(width - crop, 0))
    top = min(max(y + GLCM_PATCH // 2 - crop // 2, 0), max(height - crop, 0))
    return left, top, min(left + crop, width), min(top + crop, height)


def sprite_cell(size):
    """A sprite cell's side: `size` rounded up to JPEG's 16-pixel blocks, so no thumbnail bleeds into the next."""
    return -(-size // 16) * 16


def block_files(job, out, thumb_size, crop_size):
    """Thumbnails and crops of a block of prompts, as two sprite files: a JPEG of the thumbnails (a row per prompt, a
    cell per folder) and a lossless PNG of the crops (a row per prompt, two cells per folder: highest, lowest GLCM).

    One file per block instead of one per image: chromium's memory rose by about 1.6 MB per distinct image file the
    page loads (7.2 GB for 4,500 files, BENCHMARKS.md), so 18,000 files for 2,000 prompts × 3 folders do not open
    where 200 sprites do.
    job: (block index, [[path per folder] per prompt]). Returns, per prompt, per folder: {"thumb": (x, y, w, h),
    "crops": [(x, y, w, h), (x, y, w, h)], "size": (width, height)} and the two sprites' relative paths.
    """
    index, prompts = job
    folders, cell = len(prompts[0]), sprite_cell(thumb_size)
    thumbs = Image.new("RGB", (folders * cell, len(prompts) * cell), "white")
    crops = Image.new("RGB", (2 * folders * crop_size, len(prompts) * crop_size), "white")
    placed = []
    for row, paths in enumerate(prompts):
        corners = glcm_extremes(paths[0])  # the first folder's extremes, the same region in every folder
        columns = []
        for k, path in enumerate(paths):
            with Image.open(path) as image:
                image = image.convert("RGB")
            width, height = image.size
            boxes = []
            for which, (x, y) in enumerate(corners):
                crop = image.crop(crop_box(width, height, x, y, crop_size))
                at = ((2 * k + which) * crop_size, row * crop_size)
                crops.paste(crop, at)
                boxes.append((*at, *crop.size))
            image.thumbnail((thumb_size, thumb_size), Image.Resampling.LANCZOS)
            thumbs.paste(image, (k * cell, row * cell))
            columns.append({"thumb": (k * cell, row * cell, *image.size), "crops": boxes, "size": (width, height)})
        placed.append(columns)
    names = [Path("sprites") / f"{kind}_{index:05d}.{ext}" for kind, ext in (("thumbs", "jpg"), ("crops", "png"))]
    (out / "sprites").mkdir(parents=True, exist_ok=True)
    thumbs.save(out / names[0], quality=90)
    crops.save(out / names[1])
    return placed, [n.as_posix() for n in names]


#################################################################################
#                                      Page                                     #
#################################################################################

def tests_sentence(tests):
    """What the significance marks mean for the m tests of a comparison, in one paragraph of plain text."""
    m, b, needed = tests["m"], tests["bootstrap"], tests["holm_min_bootstrap"]
    if not m:
        return "No differences were tested (--bootstrap 0: no intervals and no p-values)."
    text = (f"{m} tests were made (each pair of folders × each metric they share). '*': the difference's 95 % "
            f"interval excludes 0, a test on its own: between runs that do not differ, about 1 in 20 tests gets it "
            f"by chance ({m / 20:.1f} expected here). 'H': significant after Holm–Bonferroni over all {m} tests "
            f"(family-wise error {tests['alpha'] * 100:g} %), from each row's bootstrap p-value.")
    if b < needed:
        text += (f" With --bootstrap {b} no p-value falls below 1/({b} + 1), so Holm cannot reject any of {m} tests: "
                 f"use --bootstrap {needed} or more.")
    return text + (" Either mark says a difference is larger than the resampling noise of these images, not that it "
                   "is large enough to matter (docs/comparing.md).")


def summary_tables(comparison):
    """HTML of the per-folder table and the pairs table."""
    labels = list(comparison["folders"])
    metrics = list(dict.fromkeys(m for v in comparison["folders"].values() for m in v))
    cell = lambda v: "–" if v is None else f"{v:.4g}"  # noqa: E731
    bias = lambda v: f" bias {cell(v['bias'])}" if v.get("bias") is not None else ""  # noqa: E731
    parts = [f"<h2>Summary</h2><p id='tests'>{html.escape(tests_sentence(comparison['tests']))}</p>"
             "<table id='summary'><tr><th>metric</th>"
             + "".join(f"<th>{html.escape(label)}</th>" for label in labels) + "</tr>"]
    for metric in metrics:
        parts.append(f"<tr><td class='l'>{metric}</td>" + "".join(
            f"<td>{cell(v['value'])} [{cell(v['ci95'][0])}, {cell(v['ci95'][1])}] n={v['n']}{bias(v)}</td>" if v
            else "<td>–</td>" for v in (comparison["folders"][label].get(metric) for label in labels)) + "</tr>")
    parts.append(f"</table><h3>Differences (b − a), 95 % bootstrap intervals; * : the interval excludes 0; H: "
                 f"significant after Holm–Bonferroni over the {comparison['tests']['m']} tests</h3>"
                 "<p>A * says the difference is larger than the resampling noise of these images, not that it is "
                 "large enough to matter: read it against its size relative to a, and against how far the metric "
                 "moves between two runs of one model with another seed (docs/comparing.md).</p>"
                 "<table id='pairs'><tr><th>a</th><th>b</th><th>metric</th><th>b − a</th><th>relative to a</th>"
                 "<th>95 % interval</th><th>n pairs</th><th>p</th><th></th></tr>")
    for p in comparison["pairs"]:
        mark = "<span class='sig'>*</span>" if p["significant"] else "<span class='ns'>n.s.</span>"
        mark += " <span class='sig'>H</span>" if p["significant_holm"] else ""
        base = comparison["folders"][p["a"]][p["metric"]]["value"]
        relative = f"{100 * p['difference'] / abs(base):+.3g} %" if base else "–"
        parts.append(f"<tr><td class='l'>{html.escape(p['a'])}</td><td class='l'>{html.escape(p['b'])}</td>"
                     f"<td class='l'>{p['metric']}</td><td>{cell(p['difference'])}</td><td>{relative}</td>"
                     f"<td>[{cell(p['ci95'][0])}, {cell(p['ci95'][1])}]</td>"
                     f"<td>{p['n_pairs'] if p['paired'] else 'unpaired'}</td><td>{cell(p['p_value'])}</td>"
                     f"<td>{mark}</td></tr>")
    return "".join(parts) + "</table>"


def image_metrics(row):
    """One line of an image's metrics."""
    parts = [f"GLCM {row['glcm_score']:.4f}" if "glcm_score" in row else None,
             f"CR {row['raw_bytes'] / row['compressed_bytes']:.2f}" if "compressed_bytes" in row else None,
             f"CLIP {row['clip_score']:.2f}" if "clip_score" in row else None,
             f"Aes {row['aesthetics']:.2f}" if "aesthetics" in row else None]
    return " · ".join(p for p in parts if p)


def sprite_img(src, box, css_class, alt, title, extra=""):
    """An <img> showing the box (x, y, w, h) of a sprite at 1:1."""
    x, y, w, h = box
    return (f"<img class='{css_class}' src='{quote(src)}' width='{w}' height='{h}' style='object-position:-{x}px "
            f"-{y}px'{extra} alt='{html.escape(alt)}' title='{html.escape(title)}'>")


def crop_note(width, height, crop_size):
    """What the crops of a width × height image show when it is smaller than the crop (else "")."""
    if width >= crop_size and height >= crop_size:
        return ""
    if width <= crop_size and height <= crop_size:
        return f" (the image is smaller than the {crop_size}² crop: both crops show all of it)"
    side = "width" if width < crop_size else "height"
    return f" (the image is smaller than the {crop_size}² crop: each crop spans its full {side})"


def prompt_section(out, runs, name, placed, sprites, crop_size):
    """HTML of one prompt: a column per folder (thumbnail, metrics, crops, zoom view)."""
    prompt = next((run["rows"][name].get("prompt") for run in runs if run["rows"][name].get("prompt")), "")
    parts = [f"<div class='prompt' id='p-{html.escape(Path(name).stem)}'><b>{html.escape(name)}</b> "
             f"{html.escape(prompt)}<div class='row'>"]
    for run, item in zip(runs, placed):
        # Relative to the folder as given, not as resolved: a browser resolves the page's links from the path it was
        # opened by, symlinks included.
        full = quote(Path(os.path.relpath(os.path.abspath(run["images"][name]), os.path.abspath(out))).as_posix())
        width, height = item["size"]
        label = html.escape(run["label"])
        parts.append(
            f"<div class='col'><div><b>{label}</b></div>"
            + sprite_img(sprites[0], item["thumb"], "thumb", f"{run['label']} {name}", "click: zoom here in every column",
                         f" data-full='{full}' data-w='{width}' data-h='{height}'")
            + f"<div class='m'>{image_metrics(run['rows'][name])} ({width}×{height})</div><div class='crops'>"
            + "".join(sprite_img(sprites[1], box, "crop", f"{which}-GLCM patch",
                                 f"{which}-GLCM 64² patch of the first folder, 1:1")
                      for box, which in zip(item["crops"], ("highest", "lowest")))
            + f"</div><div class='m'>crops: highest, lowest GLCM{crop_note(width, height, crop_size)} · zoom (click a "
              "thumbnail):</div>"
            "<div class='zoom'><img alt=''></div></div>")
    return "".join(parts) + "</div></div>"


def write_report(out, runs, comparison, paired, unpaired, thumb_size=256, crop_size=128, workers=None,
                 prompts_per_sprite=PROMPTS_PER_SPRITE):
    """Write out/report.html with its sprites of thumbnails and crops (made by `workers` processes); returns the
    page's path."""
    out = Path(out)
    shutil.rmtree(out / "sprites", ignore_errors=True)  # a previous report's sprites, which this page would not use
    task = partial(block_files, out=out, thumb_size=thumb_size, crop_size=crop_size)
    prompts = [[run["images"][name] for run in runs] for name in paired]
    jobs = [(i // prompts_per_sprite, prompts[i:i + prompts_per_sprite])
            for i in range(0, len(prompts), prompts_per_sprite)]
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    with multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else nullcontext() as pool:
        results = pool.imap(task, jobs) if workers > 1 else map(task, jobs)
        with tqdm(total=len(prompts), desc="report", unit="prompt") as bar:
            made = []
            for placed, sprites in results:
                made += [(item, sprites) for item in placed]
                bar.update(len(placed))
    sections = [prompt_section(out, runs, name, placed, sprites, crop_size)
                for name, (placed, sprites) in zip(paired, made)]
    notes = "".join(f"<p>{html.escape(label)}: {len(names)} image(s) without a match in every folder, left out: "
                    f"{html.escape(', '.join(names[:10]))}{' …' if len(names) > 10 else ''}</p>"
                    for label, names in unpaired.items() if names)
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>Comparison</title><style>"
            + STYLE % {"column": max(thumb_size, 2 * crop_size + 8), "crop": crop_size} + "</style></head><body><h1>Comparison of "
            + ", ".join(html.escape(run["label"]) for run in runs) + "</h1>"
            + "".join(f"<p>{html.escape(run['label'])}: {html.escape(run['folder'])} (per-image metrics: "
                      f"{html.escape(run['source'])})</p>" for run in runs)
            + summary_tables(comparison) + notes
            + f"<h2>Images ({len(paired)} prompts)</h2><p>Crops: {crop_size}² at 1:1 around the highest- and "
              "lowest-GLCM 64² patch of the first folder's image. Click a thumbnail: every column's zoom view shows "
              "the original at 1:1 around that point.</p>"
            + "".join(sections) + "<script>" + SCRIPT + "</script></body></html>\n")
    temporary = out / "report.html.partial"
    temporary.write_text(page, encoding="utf-8")
    os.replace(temporary, out / "report.html")
    return out / "report.html"
