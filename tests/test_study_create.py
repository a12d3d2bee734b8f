"""study.py create / raters / export: pairs by file name with their prompts, every image checked, gold pairs against a
heavy blur, each rater's order and sides (balanced, seeded) and repeats; patches cut at native resolution with the
GLCM Score and Compression Ratio of eval.py, held against scikit-image and Pillow computed here; the CLI's errors."""
import csv
import io
import json
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageFilter
from skimage.feature import graycomatrix
from skimage.measure import shannon_entropy

import study
from errors import UsageError
from human_eval import design, store
from study_helpers import ROOT, XSS_PROMPT, make_runs, make_study


def run_cli(*argv):
    return subprocess.run([sys.executable, "study.py", *map(str, argv)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


#################################################################################
#                                    Pairs                                      #
#################################################################################

def test_pairs_are_matched_by_file_name_with_their_prompts_and_unpaired_images_left_out(tmp_path):
    a, b = make_runs(tmp_path / "runs", n=4)
    (a / "only_a.png").write_bytes((a / "00001.png").read_bytes())
    (a / "notes.txt").write_text("not an image")
    design.create_pairwise(tmp_path / "s", [a, b], ["base", "wlf"], list(store.PAIRWISE_QUESTIONS))
    conn = store.connect(tmp_path / "s")
    items = store.items(conn, "pairwise")
    assert [i["name"] for i in items] == [f"{k:05d}.png" for k in range(4)]
    assert items[0]["prompt"] == XSS_PROMPT and items[1]["prompt"] == "a photo of coffee"
    for item in items:
        paths = [conn.execute("SELECT path, label FROM images WHERE id = ?", (item[k],)).fetchone()
                 for k in ("image_a", "image_b")]
        assert [p["label"] for p in paths] == ["base", "wlf"]
        assert [p["path"] for p in paths] == [str((a / item["name"]).resolve()), str((b / item["name"]).resolve())]
    meta = store.read_meta(conn)
    assert meta["questions"] == list(store.PAIRWISE_QUESTIONS) and meta["labels"] == ["base", "wlf"]


def test_prompts_come_from_a_metadata_jsonl_when_the_folders_have_none_and_without_prompts_that_question_goes(
        tmp_path):
    a, b = make_runs(tmp_path / "runs", n=3, prompts=False)
    metadata = tmp_path / "metadata.jsonl"
    metadata.write_text("".join(json.dumps({"file_name": f"images/{k:05d}.png", "text": f"caption {k}"}) + "\n"
                                for k in range(3)))
    design.create_pairwise(tmp_path / "s1", [a, b], ["a", "b"], list(store.PAIRWISE_QUESTIONS), prompts_file=metadata)
    assert [i["prompt"] for i in store.items(store.connect(tmp_path / "s1"))] == ["caption 0", "caption 1", "caption 2"]
    design.create_pairwise(tmp_path / "s2", [a, b], ["a", "b"], list(store.PAIRWISE_QUESTIONS))
    conn = store.connect(tmp_path / "s2")
    assert store.read_meta(conn)["questions"] == ["aesthetics", "fine_details"]
    assert {i["prompt"] for i in store.items(conn)} == {None}


def test_gold_pairs_put_an_image_against_its_heavy_blur(tmp_path):
    study_dir, _ = make_study(tmp_path, n=8, raters=0, gold=0.25, size=(400, 300))
    conn = store.connect(study_dir)
    gold = [i for i in store.items(conn) if i["gold"]]
    assert len(gold) == 2 and store.read_meta(conn)["gold_questions"] == ["aesthetics", "fine_details"]
    for item in gold:
        original, blurred = (conn.execute("SELECT * FROM images WHERE id = ?", (item[k],)).fetchone()
                             for k in ("image_a", "image_b"))
        assert blurred["label"] == design.GOLD_LABEL and original["label"] in ("a", "b")
        sharp = Image.open(study_dir / original["path"]).convert("RGB")
        soft = np.asarray(Image.open(study_dir / blurred["path"]).convert("RGB"))
        radius = max(4, 0.02 * max(sharp.size))  # heavy: 2 % of the longer side (8 px here), at least 4 pixels
        assert np.array_equal(soft, np.asarray(sharp.filter(ImageFilter.GaussianBlur(radius))))
        detail = lambda g: np.abs(np.diff(np.asarray(g, float), axis=1)).mean()  # noqa: E731
        assert detail(soft) < detail(sharp)


#################################################################################
#                                 Raters' tasks                                 #
#################################################################################

def test_each_rater_sees_every_pair_once_sides_balanced_order_shuffled_repeats_later_and_swapped(tmp_path):
    study_dir, raters = make_study(tmp_path, n=8, raters=4, gold=0.25, repeat=0.25)
    conn = store.connect(study_dir)
    items = {i["id"]: i for i in store.items(conn)}
    orders = []
    for rater, _ in raters:
        tasks = conn.execute("SELECT * FROM tasks WHERE rater = ? ORDER BY position", (rater,)).fetchall()
        first = [t for t in tasks if t["repeat_of"] is None]
        assert sorted(t["item"] for t in first) == sorted(items)  # every pair and every gold pair once
        swapped = Counter(t["swapped"] for t in first)
        assert abs(swapped[0] - swapped[1]) <= 1  # balanced left / right
        repeats = [t for t in tasks if t["repeat_of"] is not None]
        assert len(repeats) == 2  # a quarter of the 8 pairs
        position = {t["id"]: t["position"] for t in tasks}
        for t in repeats:
            original = conn.execute("SELECT * FROM tasks WHERE id = ?", (t["repeat_of"],)).fetchone()
            assert original["item"] == t["item"] and not items[t["item"]]["gold"]
            assert original["swapped"] == 1 - t["swapped"] and position[t["id"]] > position[original["id"]]
        assert [t["position"] for t in tasks] == list(range(len(tasks)))
        orders.append([t["item"] for t in first])
    assert len({tuple(o) for o in orders}) == 4  # each rater their own order
    again, _ = make_study(tmp_path / "again", n=8, raters=4, gold=0.25, repeat=0.25)
    seeded = [[(t["item"], t["swapped"]) for t in store.connect(again).execute(
        "SELECT * FROM tasks WHERE rater = ? ORDER BY position", (rater,))] for rater, _ in raters]
    assert seeded == [[(t["item"], t["swapped"]) for t in conn.execute(
        "SELECT * FROM tasks WHERE rater = ? ORDER BY position", (rater,))] for rater, _ in raters]


def test_tasks_per_rater_deals_the_pairs_so_that_each_gets_raters_evenly(tmp_path):
    study_dir, _ = make_study(tmp_path, n=7, raters=5, tasks_per_rater=3)
    conn = store.connect(study_dir)
    per_rater = Counter(r[0] for r in conn.execute("SELECT rater FROM tasks"))
    assert set(per_rater.values()) == {3}
    per_item = Counter(r[0] for r in conn.execute("SELECT item FROM tasks"))
    assert len(per_item) == 7 and max(per_item.values()) - min(per_item.values()) <= 1


def test_raters_prints_one_id_and_token_line_per_new_rater_and_nothing_else(tmp_path):
    study_dir, _ = make_study(tmp_path, n=2, raters=0)
    done = run_cli("raters", study_dir, "--add", 3)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["r001", "r002", "r003"]
    assert all(len(line.split()) == 2 and len(line.split()[1]) >= 32 for line in lines)
    tokens = {line.split()[1] for line in lines}
    assert tokens == {t for _, t in store.raters(store.connect(study_dir))} and len(tokens) == 3


#################################################################################
#                                    Patches                                    #
#################################################################################

def glcm_reference(grey):
    """The paper's GLCM Score written out: OpenCV's grey // 4, 64×64 patches, skimage's GLCM, shannon_entropy."""
    scores = []
    for y in range(0, grey.shape[0] - 63, 64):
        for x in range(0, grey.shape[1] - 63, 64):
            glcm = graycomatrix(grey[y:y + 64, x:x + 64], distances=[1, 2, 3, 4],
                                angles=[0, np.pi / 4, np.pi / 2, np.pi * 3 / 4], levels=64, normed=True)
            scores.append(shannon_entropy(glcm))
    return float(np.mean(scores))


def test_patches_are_native_pixels_with_eval_pys_glcm_score_and_compression_ratio(tmp_path):
    import cv2

    folders = make_runs(tmp_path / "runs", n=2, size=(200, 150))
    design.create_patches(tmp_path / "s", folders, ["a", "b"], 128, 2, seed=3, workers=1)
    conn = store.connect(tmp_path / "s")
    items = store.items(conn, "patch")
    assert len(items) == 2 * 2 * 2 and {i["label"] for i in items} == {"a", "b"}
    corners = {}
    for item in items:
        path = conn.execute("SELECT path FROM images WHERE id = ?", (item["image_a"],)).fetchone()[0]
        patch = np.asarray(Image.open(tmp_path / "s" / path).convert("RGB"))
        source = np.asarray(Image.open(item["source"]).convert("RGB"))
        assert np.array_equal(patch, source[item["y"]:item["y"] + 128, item["x"]:item["x"] + 128])
        corners.setdefault(item["name"].split("-", 1)[1], set()).add((item["x"], item["y"]))
        grey = cv2.cvtColor(np.ascontiguousarray(patch[:, :, ::-1]), cv2.COLOR_BGR2GRAY) // 4
        assert item["glcm_score"] == pytest.approx(glcm_reference(grey), abs=1e-12)
        jpeg = io.BytesIO()
        Image.fromarray(patch).save(jpeg, format="JPEG", quality=95)
        assert (item["raw_bytes"], item["compressed_bytes"]) == (128 * 128 * 3, jpeg.tell())
    assert all(len(v) == 1 for v in corners.values())  # the same places in both folders' image of one name


#################################################################################
#                                 The command line                              #
#################################################################################

@pytest.mark.parametrize("case", ["corrupt", "missing-folder", "tiff", "labels", "exists", "gold-patches",
                                  "small-patch", "one-folder", "no-pairs", "prompts-missing", "shares"])
def test_bad_input_is_a_usage_error_naming_what_to_fix_and_leaves_no_study(tmp_path, case):
    a, b = make_runs(tmp_path / "runs", n=2)
    out = tmp_path / "s"
    argv = ["create", "--kind", "pairwise", "--folders", a, b, "--out", out]
    expected = {"corrupt": "00001.png is not a readable image", "missing-folder": "nowhere",
                "tiff": "convert it to PNG",
                "labels": "--labels", "exists": "already holds a study", "gold-patches": "--gold",
                "small-patch": "--patch_size", "one-folder": "two --folders", "no-pairs": "no image file name",
                "prompts-missing": "no prompt for 00001.png", "shares": "--repeat is a share"}[case]
    if case == "corrupt":
        (b / "00001.png").write_bytes((b / "00001.png").read_bytes()[:300])
    elif case == "missing-folder":
        argv[4] = tmp_path / "nowhere"
    elif case == "tiff":
        Image.open(a / "00000.png").save(a / "00000.png", format="TIFF")
    elif case == "labels":
        argv += ["--labels", "x", "x"]
    elif case == "exists":
        study.main(study.parse_args(list(map(str, argv))))
    elif case == "gold-patches":
        argv = ["create", "--kind", "patches", "--folders", a, "--out", out, "--gold", "0.1"]
    elif case == "small-patch":
        argv = ["create", "--kind", "patches", "--folders", a, "--out", out, "--patch_size", "32"]
    elif case == "one-folder":
        argv[4:6] = [a]
    elif case == "no-pairs":
        (b / "00000.png").rename(b / "x0.png")
        (b / "00001.png").rename(b / "x1.png")
    elif case == "prompts-missing":
        rows = (a / "per_image.csv").read_text().splitlines()
        (a / "per_image.csv").write_text("\n".join(rows[:2]) + "\n")
    elif case == "shares":
        argv += ["--repeat", "1.5"]
    with pytest.raises(UsageError) as error:
        study.main(study.parse_args(list(map(str, argv))))
    assert expected in str(error.value) and "\n" not in str(error.value)
    assert (out / store.DB_NAME).exists() == (case == "exists")  # nothing half-made left behind


def test_the_command_line_reports_a_usage_error_in_one_line_with_exit_status_2(tmp_path):
    a, b = make_runs(tmp_path / "runs", n=2)
    (b / "00001.png").write_bytes(b"\x89PNG not really")
    done = run_cli("create", "--kind", "pairwise", "--folders", a, b, "--out", tmp_path / "s")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"study.py: error: --folders: {b / '00001.png'}")


def test_analyze_takes_bootstrap_0_or_at_least_200(tmp_path):
    study_dir, [(_, token)] = make_study(tmp_path, n=2, raters=1)
    conn = store.connect(study_dir)
    meta = store.read_meta(conn)
    while (task := store.next_task(conn, "r001", meta)["task"]) is not None:
        with store.transaction(conn):
            store.record_answer(conn, "r001", task["id"], {q: "left" for q in task["questions"]}, meta)
    for value in (0, 200):
        args = study.parse_args(["analyze", str(study_dir), "--out", str(tmp_path / f"r{value}"), "--bootstrap",
                                 str(value)])
        results = study.main(args)
        assert results["study"]["bootstrap"] == value
    assert results["pairwise"]["aesthetics"]["win_rate_a_ci95"] != [None, None]
    for value in (1, 199, -1):
        with pytest.raises(UsageError, match="--bootstrap"):
            study.main(study.parse_args(["analyze", str(study_dir), "--out", str(tmp_path / "x"), "--bootstrap",
                                         str(value)]))


def test_export_writes_one_row_per_answer_to_one_question_with_the_task_id_next_gave(tmp_path):
    study_dir, raters = make_study(tmp_path, n=3, raters=2, gold=0.34, repeat=0.34)
    conn = store.connect(study_dir)
    meta = store.read_meta(conn)
    given = []
    for rater, _ in raters:
        while (task := store.next_task(conn, rater, meta)["task"]) is not None:
            answers = {q: ("left", "right")[(task["id"] + k) % 2] for k, q in enumerate(task["questions"])}
            with store.transaction(conn):
                store.record_answer(conn, rater, task["id"], answers, meta)
            given.append((rater, task, answers))
    done = run_cli("export", study_dir, "--out", tmp_path / "answers.csv")
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(open(tmp_path / "answers.csv", newline="")))
    assert set(store.EXPORT_COLUMNS) <= set(rows[0])
    assert len(rows) == sum(len(a) for *_, a in given) == 2 * (3 + 1 + 1) * 3
    by_key = {(r["rater"], int(r["task"]), r["question"]): r for r in rows}
    for rater, task, answers in given:
        task_row, item = conn.execute("SELECT * FROM tasks WHERE id = ?", (task["id"],)).fetchone(), None
        item = conn.execute("SELECT * FROM items WHERE id = ?", (task_row["item"],)).fetchone()
        labels = [conn.execute("SELECT label FROM images WHERE id = ?", (item[k],)).fetchone()[0]
                  for k in ("image_a", "image_b")]
        shown = labels[::-1] if task_row["swapped"] else labels  # what was on the left and on the right
        for question, answer in answers.items():
            row = by_key[(rater, task["id"], question)]
            assert (row["answer"], row["label_left"], row["label_right"]) == (answer, shown[0], shown[1])
            assert row["winner"] == shown[0 if answer == "left" else 1]
            assert row["gold"] == str(item["gold"]) and (row["repeat_of"] != "") == (task_row["repeat_of"] is not None)
            if item["gold"]:
                assert row["gold_answer"] == ("right" if task_row["swapped"] else "left")
