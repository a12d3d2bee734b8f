"""study.py analyze on answers stored through the study's own functions, each figure recomputed here from what the
simulated raters chose: win rates without gold pairs, repeats or screened raters; position bias; Krippendorff's
alpha (the krippendorff package); judges combined over both orders and Cohen's kappa against the people's majority;
for patches, SRCC / PLCC of per-rater z-scores (scipy) with --metric_csv joined; and the plots' marks."""
import csv
import json

import krippendorff
import numpy as np
import pytest
from PIL import Image
from scipy import stats as scipy_stats

import study
from errors import UsageError
from human_eval import assign, design, plots, store
from study_helpers import make_runs, make_study

LABELS = ("a", "b")


def answer(conn, meta, rater, choose):
    """Answer every task of a rater: choose(task row, item row, labels shown [left, right]) -> {question: side}."""
    while (task := store.next_task(conn, rater, meta)["task"]) is not None:
        row, item, shown = store.task_sides(conn, task["id"])
        labels = [conn.execute("SELECT label FROM images WHERE id = ?", (i,)).fetchone()[0] for i in shown]
        with store.transaction(conn):
            store.record_answer(conn, rater, task["id"], choose(row, item, labels), meta)


def analyze(study_dir, out, *flags):
    return study.main(study.parse_args(["analyze", str(study_dir), "--out", str(out), "--bootstrap", "200", *flags]))


@pytest.fixture(scope="module")
def pairwise_study(tmp_path_factory):
    """6 pairs + 2 gold, a third repeated; r001-r004 prefer a by a per-rater, per-question rule, r005 always says
    left and picks the blur on gold pairs; a judge 'steady' agrees in both orders, a judge 'lefty' always says first."""
    root = tmp_path_factory.mktemp("pairwise")
    study_dir, raters = make_study(root, n=6, raters=5, gold=0.34, repeat=0.34)
    conn = store.connect(study_dir)
    meta = store.read_meta(conn)

    def person(k):
        def choose(task, item, labels):
            if item["gold"]:
                return {q: ("left" if labels[0] != design.GOLD_LABEL else "right") for q in meta["questions"]}
            wants = {q: "a" if (item["id"] + k + j) % 4 else "b" for j, q in enumerate(meta["questions"])}
            return {q: "left" if labels[0] == w else "right" for q, w in wants.items()}
        return choose

    for k, (rater, _) in enumerate(raters[:4]):
        answer(conn, meta, rater, person(k))
    careless = lambda task, item, labels: {q: "left" if not item["gold"] or labels[0] == design.GOLD_LABEL  # noqa
                                           else "right" for q in meta["questions"]}
    answer(conn, meta, raters[4][0], careless)
    for judge, rule in (("steady", lambda item, labels: "a" if item["id"] % 3 else "b"),
                        ("lefty", lambda item, labels: labels[0])):
        for task_id in assign.judge_tasks(conn, judge):
            row, item, shown = store.task_sides(conn, task_id)
            labels = [conn.execute("SELECT label FROM images WHERE id = ?", (i,)).fetchone()[0] for i in shown]
            pick = rule(item, labels) if not item["gold"] else labels[labels.index(design.GOLD_LABEL) ^ 1]
            with store.transaction(conn):
                store.record_answer(conn, store.JUDGE_PREFIX + judge, task_id,
                                    {q: "left" if labels[0] == pick else "right" for q in meta["questions"]}, meta)
    results = analyze(study_dir, root / "out")
    return study_dir, root / "out", results, store.answer_rows(conn), meta


def test_win_rates_count_the_first_answers_of_raters_who_passed_gold(pairwise_study):
    study_dir, out, results, rows, meta = pairwise_study
    assert results["gold"]["excluded"] == ["r005"]
    assert results["gold"]["raters"]["r005"]["pass_rate"] < 0.8 <= results["gold"]["raters"]["r001"]["pass_rate"]
    kept = [r for r in rows if r["rater"] in ("r001", "r002", "r003", "r004") and not r["gold"] and not r["repeat_of"]]
    for question in meta["questions"]:
        mine = [r for r in kept if r["question"] == question]
        wins = sum(r["winner"] == "a" for r in mine)
        found = results["pairwise"][question]
        assert (found["n"], found["wins_a"], found["wins_b"], found["ties"]) == (24, wins, 24 - wins, 0)
        assert found["win_rate_a"] == pytest.approx(wins / 24)
        low, high = found["win_rate_a_ci95"]
        assert low <= found["win_rate_a"] <= high and found["significant"] == (not low <= 0.5 <= high)
        left = results["position_bias"]["people"][question]
        assert (left["n"], left["left"]) == (24, sum(r["answer"] == "left" for r in mine))
        items = sorted({r["item"] for r in mine})
        reliability = np.full((4, len(items)), np.nan)
        for r in mine:
            reliability[int(r["rater"][1:]) - 1, items.index(r["item"])] = r["winner"] == "a"
        assert results["agreement"]["krippendorff_alpha"][question] == pytest.approx(
            krippendorff.alpha(reliability_data=reliability, level_of_measurement="nominal"), abs=1e-12)
        assert results["agreement"]["repeat_consistency"][question]["n"] == 4 * 2


def test_a_judge_is_combined_over_both_orders_and_compared_with_the_peoples_majority(pairwise_study):
    study_dir, out, results, rows, meta = pairwise_study
    steady, lefty = results["judge"]["steady"], results["judge"]["lefty"]
    pairs = sorted({r["item"] for r in rows if not r["gold"]})
    for question in meta["questions"]:
        wins = sum(1 for item in pairs if item % 3)
        assert (steady[question]["n"], steady[question]["wins_a"], steady[question]["ties"]) == (6, wins, 0)
        assert steady[question]["order_agreement"] == 1.0 and steady[question]["first_position_rate"] == 0.5
        assert (lefty[question]["ties"], lefty[question]["win_rate_a"]) == (6, 0.5)  # every pair: the orders differ
        assert lefty[question]["order_agreement"] == 0.0 and lefty[question]["first_position_rate"] == 1.0
        votes = {}
        for r in rows:
            if r["rater"] in ("r001", "r002", "r003", "r004") and not r["gold"] and not r["repeat_of"] \
                    and r["question"] == question:
                votes.setdefault(r["item"], []).append(r["winner"] == "a")
        people = ["a" if np.mean(votes[i]) > 0.5 else "b" if np.mean(votes[i]) < 0.5 else "tie" for i in pairs]
        judge = ["a" if i % 3 else "b" for i in pairs]
        p_o = np.mean([x == y for x, y in zip(people, judge)])
        p_e = sum(people.count(c) * judge.count(c) for c in ("a", "b", "tie")) / len(pairs) ** 2
        found = results["human_judge"]["steady"][question]
        assert found["n"] == 6 and found["agreement"] == pytest.approx(p_o)
        assert found["kappa"] == pytest.approx((p_o - p_e) / (1 - p_e))
    assert results["gold"]["judges"]["steady"]["pass_rate"] == 1.0


def test_results_csv_holds_the_json_numbers_and_the_plot_marks_each_win_rate(pairwise_study):
    study_dir, out, results, rows, meta = pairwise_study
    assert json.loads((out / "results.json").read_text()) == results
    table = list(csv.DictReader(open(out / "results.csv", newline="")))
    people = {r["question"]: r for r in table if r["section"] == "pairwise" and r["statistic"] == "win_rate_a"}
    for question, found in results["pairwise"].items():
        assert float(people[question]["value"]) == pytest.approx(found["win_rate_a"])
        assert float(people[question]["ci95_low"]) == pytest.approx(found["win_rate_a_ci95"][0])
    judged = {(r["who"], r["question"], r["statistic"]): r for r in table if r["section"] == "judge"}
    for name, per_question in results["judge"].items():
        for question, found in per_question.items():
            without = judged[(name, question, "win_rate_a_without_ties")]
            assert without["value"] == ("" if found["win_rate_a_without_ties"] is None else
                                        str(found["win_rate_a_without_ties"]))
            assert float(judged[(name, question, "tie_rate")]["value"]) == found["ties"] / found["n"]
    image = np.asarray(Image.open(out / "preference.png").convert("RGB"))
    dots = plots.preference_plot(results, out / "again.png")
    assert np.array_equal(np.asarray(Image.open(out / "again.png").convert("RGB")), image)
    expected = {(q, "people"): v["win_rate_a"] for q, v in results["pairwise"].items()}
    expected.update({(q, f"judge {name}"): v["win_rate_a"] for name, per in results["judge"].items()
                     for q, v in per.items()})
    assert {(q, who) for q, who, *_ in dots} == set(expected)
    for question, who, x, y, colour in dots:
        above = image[int(y) - 4]  # a row through the dot, above its interval line
        columns = np.flatnonzero((np.abs(above.astype(int) - colour).sum(1) < 30) & (np.arange(len(above)) >
                                                                                     plots.LEFT - 10))
        centre = (columns.min() + columns.max()) / 2
        assert abs(centre - (plots.LEFT + expected[(question, who)] * plots.PLOT_WIDTH)) <= 1.5, (question, who)


#################################################################################
#                                    Patches                                    #
#################################################################################

@pytest.fixture(scope="module")
def patch_study(tmp_path_factory):
    """12 patches of 64² (3 images × 2 folders × 2), 4 raters rating by detail with their own offset and scale."""
    root = tmp_path_factory.mktemp("patches")
    folders = make_runs(root / "runs", n=3, size=(160, 128))
    study_dir = root / "study"
    design.create_patches(study_dir, folders, list(LABELS), 64, 2, repeat=0.25, workers=1)
    conn = store.connect(study_dir)
    meta = store.read_meta(conn)
    items = {i["id"]: i for i in store.items(conn)}
    order = {item: k for k, item in enumerate(sorted(items, key=lambda i: items[i]["glcm_score"]))}
    rng = np.random.default_rng(0)
    for k, (rater, _) in enumerate(assign.add_raters(conn, 4)):
        offset, scale = (2, 1, 3, 2)[k], (0.5, 0.7, 0.4, 0.6)[k]

        def rate(task, item, labels):
            value = offset + scale * order[item["id"]] + rng.normal(0, 0.8)
            return {"rating": int(np.clip(round(value), 1, 10))}
        answer(conn, meta, rater, rate)
    metric_csv = root / "musiq.csv"
    with open(metric_csv, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["patch", "musiq"])
        for item in items.values():
            writer.writerow([item["name"], item["compressed_bytes"] + 3 * item["x"]])
    results = analyze(study_dir, root / "out", "--metric_csv", str(metric_csv))
    return study_dir, root / "out", results, store.answer_rows(conn), items, metric_csv


def test_patch_ratings_are_z_scored_per_rater_then_correlated_with_each_metric_as_scipy_does(patch_study):
    study_dir, out, results, rows, items, metric_csv = patch_study
    patches = results["patches"]
    first = [r for r in rows if not r["repeat_of"]]
    raters, ids = sorted({r["rater"] for r in first}), sorted(items)
    ratings = np.full((len(ids), len(raters)), np.nan)
    for r in first:
        ratings[ids.index(r["item"]), raters.index(r["rater"])] = r["rating"]
    z = scipy_stats.zscore(ratings, axis=0, ddof=1)  # every rater rated every patch once
    score = z.mean(1)
    musiq = {row["patch"]: float(row["musiq"]) for row in csv.DictReader(open(metric_csv))}
    metrics = {"glcm_score": [items[i]["glcm_score"] for i in ids],
               "compression_ratio_inverse": [items[i]["compressed_bytes"] / items[i]["raw_bytes"] for i in ids],
               "musiq": [musiq[items[i]["name"]] for i in ids]}
    assert (patches["n_patches"], patches["n_raters"], patches["zscored_per_rater"]) == (12, 4, True)
    for name, values in metrics.items():
        found = patches["correlations"][name]
        srcc, plcc = scipy_stats.spearmanr(score, values), scipy_stats.pearsonr(score, values)
        assert found["srcc"] == pytest.approx(srcc.statistic, abs=1e-12)
        assert found["plcc"] == pytest.approx(plcc.statistic, abs=1e-12)
        assert found["p_value"] == pytest.approx(srcc.pvalue, rel=1e-9)
        assert found["srcc_ci95"][0] <= found["srcc"] <= found["srcc_ci95"][1]
    assert patches["correlations"]["glcm_score"]["srcc"] > 0.8  # the raters followed the GLCM order
    assert patches["agreement"]["krippendorff_alpha_interval"] == pytest.approx(
        krippendorff.alpha(reliability_data=ratings.T, level_of_measurement="interval"), abs=1e-12)
    assert patches["agreement"]["n_complete_patches"] == 12
    table = list(csv.DictReader(open(out / "patches.csv", newline="")))
    for row in table:
        k = ids.index(next(i for i in ids if items[i]["name"] == row["patch"]))
        assert float(row["mos"]) == pytest.approx(ratings[k].mean()) and float(row["mos_z"]) == pytest.approx(score[k])
    assert set(patches["by_label"]) == set(LABELS)


def test_the_correlation_plot_has_a_dot_per_patch_per_metric(patch_study):
    study_dir, out, results, rows, items, metric_csv = patch_study
    table = list(csv.DictReader(open(out / "patches.csv", newline="")))
    for row in table:
        for key in ("mos_z", "glcm_score", "compression_ratio_inverse", "musiq"):
            row[key] = float(row[key])
    dots = plots.correlation_plot(table, ["glcm_score", "compression_ratio_inverse", "musiq"],
                                  results["patches"]["correlations"], out / "again.png")
    image = np.asarray(Image.open(out / "correlation.png").convert("RGB"))
    assert np.array_equal(image, np.asarray(Image.open(out / "again.png").convert("RGB")))
    for metric, points in dots.items():
        assert len(points) == 12
        for x, y in points:
            assert tuple(image[round(y), round(x)]) == plots.COLOURS[0]
        order = np.argsort([row[metric] for row in table], kind="stable")
        xs = np.array([p[0] for p in points])
        assert np.all(np.diff(xs[order]) >= -1e-9)  # left to right in the metric's order


def test_a_metric_csv_that_does_not_fit_the_study_is_a_usage_error(patch_study, tmp_path):
    study_dir = patch_study[0]
    bad = tmp_path / "bad.csv"
    bad.write_text("file,musiq\nx.png,1\n")
    with pytest.raises(UsageError, match="'patch' column"):
        analyze(study_dir, tmp_path / "o", "--metric_csv", str(bad))
    bad.write_text("patch,musiq\nnot-a-patch.png,1\n")
    with pytest.raises(UsageError, match="not in the study"):
        analyze(study_dir, tmp_path / "o", "--metric_csv", str(bad))
