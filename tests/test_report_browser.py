"""report.html in a real headless browser (Debian's chromium): it loads without errors, shows every image and the
table, and a click moves the zoom view of every column to the same point of the full-resolution originals."""
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image, ImageFilter
from skimage import data

import compare
from detail_metrics import glcm_patch_scores, grey64

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
SIZES = [(200, 150), (160, 192)]  # (width, height) of the two prompts' images: one wide, one tall
CLICK = (0.25, 0.6)
WINDOW = ["--window-size=1200,1600", "--hide-scrollbars", "--force-device-scale-factor=1", "--force-color-profile=srgb"]  # where the test clicks, as fractions of the first thumbnail's width and height

# Runs before the page's own script: records every error, then (after load) checks the page and clicks.
SELF_TEST = """
window.__errors = [];
window.addEventListener('error', function (e) { window.__errors.push(String(e.message || e)); }, true);
window.addEventListener('load', function () {
  var imgs = Array.from(document.querySelectorAll('img'));
  var thumbs = Array.from(document.querySelectorAll('img.thumb'));
  var result = {
    thumbs: thumbs.length, crops: document.querySelectorAll('.crops img').length,
    broken: imgs.filter(function (i) { return i.getAttribute('src') && !(i.complete && i.naturalWidth > 0); })
                .map(function (i) { return i.getAttribute('src'); }),
    summary_rows: document.querySelectorAll('#summary tr').length,
    pair_rows: document.querySelectorAll('#pairs tr').length,
    zoom_src_before: Array.from(document.querySelectorAll('.zoom img')).filter(function (i) {
      return i.getAttribute('src'); }).length
  };
  var first = thumbs[0], rect = first.getBoundingClientRect();
  var crop = document.querySelector('img.crop'), box = crop.getBoundingClientRect();
  result.first_crop = [box.left + crop.clientLeft, box.top + crop.clientTop];  // its content box, past the border
  var tbox = first.getBoundingClientRect();
  result.first_thumb = [tbox.left + first.clientLeft, tbox.top + first.clientTop];
  first.dispatchEvent(new MouseEvent('click', {bubbles: true, clientX: rect.left + %(fx)s * rect.width,
                                              clientY: rect.top + %(fy)s * rect.height}));
  var zooms = Array.from(first.closest('.prompt').querySelectorAll('.zoom img'));
  var tries = 0;
  (function finish() {  // poll: under headless virtual time, timers are what lets image loading advance
    var loaded = zooms.every(function (z) { return z.complete && z.naturalWidth > 0; });
    if (!loaded && ++tries < 400) { setTimeout(finish, 25); return; }
    result.zoom = zooms.map(function (z) {
      var box = z.parentElement;
      return {src: z.getAttribute('src'), natural: [z.naturalWidth, z.naturalHeight], left: z.style.left,
              top: z.style.top, x: +box.dataset.x, y: +box.dataset.y, half: box.clientWidth / 2};
    });
    result.errors = window.__errors;
    var pre = document.createElement('pre'); pre.id = 'selftest'; pre.textContent = JSON.stringify(result);
    document.body.appendChild(pre);
  })();
});
"""


def make_folders(root):
    """Three folders of two photos each; b is a blurred copy of a, c has one extra unpaired image."""
    folders = [root / name for name in ("a", "b", "c")]
    for folder in folders:
        folder.mkdir()
    for i, ((w, h), name) in enumerate(zip(SIZES, ("astronaut", "coffee"))):
        image = Image.fromarray(getattr(data, name)()).resize((w, h), Image.BICUBIC)
        image.save(folders[0] / f"{i:05d}.png")
        image.filter(ImageFilter.GaussianBlur(2)).save(folders[1] / f"{i:05d}.png")
        image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(folders[2] / f"{i:05d}.png")
    Image.fromarray(data.chelsea()).save(folders[2] / "99999.png")
    return folders


def run_page(page):
    """Open a copy of the page with the self-test script in headless chromium; the self-test's result."""
    html = page.read_text()
    script = SELF_TEST % {"fx": CLICK[0], "fy": CLICK[1]}
    test_page = page.with_name("report_selftest.html")
    test_page.write_text(html.replace("<head>", f"<head><script>{script}</script>", 1))
    done = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
                           "--virtual-time-budget=60000", *WINDOW, "--dump-dom",
                           test_page.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r"<pre id=\"selftest\">(.*?)</pre>", done.stdout, re.S)
    assert found, f"the self-test did not finish; chromium said: {done.stderr[-2000:]}"
    return json.loads(found.group(1).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
                      .replace("&quot;", '"')), done.stderr


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """(out folder, folders, comparison) of compare.py over the three folders."""
    root = tmp_path_factory.mktemp("runs")
    folders = make_folders(root)
    out = root / "cmp"
    comparison = compare.main(compare.parse_args(["--folders", *map(str, folders), "--labels", "a", "b", "c",
                                                  "--out", str(out), "--bootstrap", "200", "--workers", "1"]))
    return out, folders, comparison


def test_page_loads_without_errors_and_shows_every_image_and_the_table(report):
    out, folders, comparison = report
    result, stderr = run_page(out / "report.html")
    assert result["errors"] == [] and "Uncaught" not in stderr
    assert result["thumbs"] == 3 * len(SIZES)  # every paired image of every folder, on the one page
    assert result["crops"] == 2 * 3 * len(SIZES)  # highest- and lowest-GLCM crops of each
    assert result["broken"] == []  # every <img> with a source decoded
    assert result["summary_rows"] == 1 + 2  # header, glcm_score, compression_ratio
    assert result["pair_rows"] == 1 + len(comparison["pairs"])
    assert result["zoom_src_before"] == 0  # originals load only on a click
    page = (out / "report.html").read_text()  # the header says how many tests were made and what the marks mean
    assert f"{len(comparison['pairs'])} tests were made" in page and "Holm" in page and "<th>p</th>" in page


def test_a_click_moves_the_zoom_to_the_same_point_of_every_full_resolution_original(report):
    out, folders, _ = report
    result, _ = run_page(out / "report.html")
    w, h = SIZES[0]
    assert len(result["zoom"]) == 3
    for zoom, folder in zip(result["zoom"], folders):
        assert (out / zoom["src"]).resolve() == (folder / "00000.png").resolve()
        assert zoom["natural"] == [w, h]  # the original's pixels, not the thumbnail's
        x, y = round(CLICK[0] * w), round(CLICK[1] * h)
        assert abs(zoom["x"] - x) <= 1 and abs(zoom["y"] - y) <= 1
        assert zoom["left"] == f"{zoom['half'] - zoom['x']:g}px" and zoom["top"] == f"{zoom['half'] - zoom['y']:g}px"


def test_every_link_works_when_the_report_is_opened_through_a_symlinked_out(report, tmp_path):
    """--out given as a symlink to a folder elsewhere: the page is opened by the link's path, so its links must be
    relative to that path, not to the folder the link resolves to."""
    _, folders, _ = report
    elsewhere = tmp_path / "disk" / "deep" / "cmp"
    elsewhere.mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(elsewhere, target_is_directory=True)
    compare.main(compare.parse_args(["--folders", *map(str, folders), "--out", str(link), "--bootstrap", "0",
                                     "--workers", "1"]))
    result, stderr = run_page(link / "report.html")
    assert result["errors"] == [] and result["broken"] == [] and "Uncaught" not in stderr
    w, h = SIZES[0]
    for zoom, folder in zip(result["zoom"], folders):  # the originals loaded through the page's relative links
        assert zoom["natural"] == [w, h]
        lexical = os.path.normpath(link / unquote(zoom["src"]))  # how a browser joins a page's path and a link
        assert Path(lexical).resolve() == (folder / "00000.png").resolve()


def page_imgs(out, css_class):
    """[(sprite path, (x, y, w, h))] of the page's <img class=css_class>, in page order (parsed from the HTML)."""
    imgs = re.findall(rf"<img class='{css_class}' src='([^']+)' width='(\d+)' height='(\d+)' "
                      r"style='object-position:-(\d+)px -(\d+)px'", (out / "report.html").read_text())
    return [(out / unquote(src), (int(x), int(y), int(w), int(h))) for src, w, h, x, y in imgs]


def shown(sprite, box):
    """The pixels an <img> shows of its sprite."""
    x, y, w, h = box
    return np.asarray(Image.open(sprite).convert("RGB"))[y:y + h, x:x + w]


def test_thumbnails_and_crops_come_from_one_sprite_each_per_block_of_prompts(report):
    out, folders, _ = report
    thumbs, crops = page_imgs(out, "thumb"), page_imgs(out, "crop")
    assert len(thumbs) == 3 * len(SIZES) and len(crops) == 2 * 3 * len(SIZES)
    assert {s for s, _ in thumbs} == {out / "sprites" / "thumbs_00000.jpg"}  # 2 prompts: one block
    assert {s for s, _ in crops} == {out / "sprites" / "crops_00000.png"}
    for (sprite, box), (i, folder) in zip(thumbs, [(i, f) for i in range(len(SIZES)) for f in folders]):
        expected = Image.open(folder / f"{i:05d}.png").convert("RGB")
        expected.thumbnail((256, 256), Image.Resampling.LANCZOS)
        assert box[2:] == expected.size
        alone = io.BytesIO()
        expected.save(alone, "JPEG", quality=90)  # the same thumbnail as a file of its own
        error = lambda a: np.abs(np.asarray(a).astype(int) - np.asarray(expected).astype(int)).mean()  # noqa: E731
        assert error(shown(sprite, box)) < error(Image.open(alone).convert("RGB")) + 0.5


def test_the_browser_draws_each_thumbnail_and_crop_at_one_to_one_from_its_sprite(report):
    out, _, _ = report
    result, _ = run_page(out / "report.html")  # where the first thumbnail and crop are on the page
    shot = out / "screenshot.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000", *WINDOW,
                    f"--screenshot={shot}", (out / "report.html").as_uri()], capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    for (sprite, box), at, exact in ((page_imgs(out, "crop")[0], result["first_crop"], True),
                                     (page_imgs(out, "thumb")[0], result["first_thumb"], False)):
        left, top = round(at[0]), round(at[1])
        drawn = pixels[top:top + box[3], left:left + box[2]].astype(int)
        expected = shown(sprite, box).astype(int)
        if exact:  # the crop: a lossless PNG, drawn pixel for pixel
            assert np.array_equal(drawn, expected)
        else:  # the thumbnail: chromium's JPEG decoder against Pillow's
            assert np.abs(drawn - expected).mean() < 1


def test_sprite_cells_start_on_jpeg_blocks_whatever_the_thumbnail_size(report, tmp_path):
    _, folders, _ = report
    compare.main(compare.parse_args(["--folders", *map(str, folders), "--out", str(tmp_path), "--bootstrap", "0",
                                     "--workers", "1", "--thumb_size", "100"]))
    for sprite, (x, y, w, h) in page_imgs(tmp_path, "thumb"):
        assert x % 16 == 0 and y % 16 == 0 and max(w, h) == 100  # no 16² JPEG block holds two thumbnails


def test_a_new_report_removes_the_sprites_of_an_earlier_one(report, tmp_path):
    _, folders, _ = report
    stale = tmp_path / "sprites" / "thumbs_00007.jpg"  # as a 160-prompt report would have left it
    stale.parent.mkdir()
    stale.write_bytes(b"old")
    compare.main(compare.parse_args(["--folders", *map(str, folders[:2]), "--out", str(tmp_path), "--bootstrap", "0",
                                     "--workers", "1"]))
    assert sorted(p.name for p in stale.parent.iterdir()) == ["crops_00000.png", "thumbs_00000.jpg"]


def test_crops_are_the_same_region_of_every_folder_at_one_to_one(report):
    out, folders, _ = report
    crops = page_imgs(out, "crop")
    for k, folder in enumerate(folders):
        crop = shown(*crops[2 * k])  # the first prompt's highest-GLCM crop of folder k
        full = np.asarray(Image.open(folder / "00000.png").convert("RGB"))
        hits = [(top, left) for top in range(full.shape[0] - crop.shape[0] + 1)
                for left in range(full.shape[1] - crop.shape[1] + 1)
                if np.array_equal(full[top:top + crop.shape[0], left:left + crop.shape[1]], crop)]
        if k == 0:
            box = hits
        assert hits and hits[0] == box[0]  # pixel for pixel, at the same place as in the first folder


def test_the_default_crops_hold_the_highest_and_lowest_glcm_patches_of_the_first_folder(report):
    out, folders, _ = report
    crops = page_imgs(out, "crop")
    full = np.asarray(Image.open(folders[0] / "00000.png").convert("RGB"))
    scores = glcm_patch_scores(grey64(full))  # the first folder's 64² patches, row-major
    per_row = full.shape[1] // 64
    for which, k in ((0, int(np.argmax(scores))), (1, int(np.argmin(scores)))):
        x, y = (k % per_row) * 64, (k // per_row) * 64
        crop = shown(*crops[which])
        patch = full[y:y + 64, x:x + 64]
        assert any(np.array_equal(crop[t:t + 64, l:l + 64], patch)
                   for t in range(crop.shape[0] - 63) for l in range(crop.shape[1] - 63))
