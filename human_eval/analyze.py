"""study.py analyze: the study's answers (store.answer_rows, the export's rows) -> results.json, results.csv,
preference.png and, for patch studies, patches.csv and correlation.png (PROTOCOL.md §12 defines every number)."""
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

import outputs
from bootstrap import json_interval
from errors import UsageError
from human_eval import plots, stats, store

RESULT_COLUMNS = ("section", "who", "question", "statistic", "value", "ci95_low", "ci95_high", "n")
PATCH_COLUMNS = ("patch", "label", "source", "x", "y", "n_ratings", "mos", "mos_ci95_low", "mos_ci95_high", "mos_z")


#################################################################################
#                                Answers as matrices                            #
#################################################################################

def matrix(rows, value):
    """(items × raters values, present mask, item ids, rater ids) of answer rows; value(row) -> a number."""
    items = sorted({r["item"] for r in rows})
    raters = sorted({r["rater"] for r in rows})
    at_item, at_rater = {v: k for k, v in enumerate(items)}, {v: k for k, v in enumerate(raters)}
    values, present = np.zeros((len(items), len(raters))), np.zeros((len(items), len(raters)))
    for r in rows:
        values[at_item[r["item"]], at_rater[r["rater"]]] = value(r)
        present[at_item[r["item"]], at_rater[r["rater"]]] = 1
    return values, present, items, raters


def is_judge(rater):
    return rater.startswith(store.JUDGE_PREFIX)


def by_question(rows):
    """{question: rows}."""
    out = defaultdict(list)
    for r in rows:
        out[r["question"]].append(r)
    return out


#################################################################################
#                                     Gold                                      #
#################################################################################

def gold_report(rows, meta):
    """Each person's gold pass rate (a gold task passes when the original beats its blur on every gold question) and
    who is left out by the rule set at creation (pass rate below gold_min_pass)."""
    tasks = defaultdict(dict)
    for r in rows:
        if r["gold"] and not r["repeat_of"] and r["question"] in meta.get("gold_questions", []):
            tasks[(r["rater"], r["task"])][r["question"]] = r["answer"] == r["gold_answer"]
    per_rater = defaultdict(list)
    for (rater, _), answers in tasks.items():
        per_rater[rater].append(all(answers.values()))
    report = {"min_pass_rate": meta.get("gold_min_pass"), "questions": meta.get("gold_questions", []), "raters": {}}
    for rater, passed in sorted(per_rater.items()):
        rate = sum(passed) / len(passed)
        report["raters"][rater] = {"n": len(passed), "passed": sum(passed), "pass_rate": rate,
                                   "excluded": rate < meta.get("gold_min_pass", 0)}
    report["excluded"] = [rater for rater, v in report["raters"].items() if v["excluded"]]
    return report


def judge_gold(rows, meta):
    """A judge's gold pass rate: the share of gold pairs whose two orders both chose the original."""
    verdicts = defaultdict(dict)
    for r in rows:
        if r["gold"] and r["question"] in meta.get("gold_questions", []):
            verdicts[(r["item"], r["question"])][r["swapped"]] = r["answer"] == r["gold_answer"]
    per_item = defaultdict(list)
    for (item, _), orders in verdicts.items():
        per_item[item].append(len(orders) == 2 and all(orders.values()))
    passed = [all(v) for v in per_item.values()]
    return {"n": len(passed), "passed": sum(passed), "pass_rate": sum(passed) / len(passed) if passed else None}


#################################################################################
#                                   Pairwise                                    #
#################################################################################

def people_pairwise(rows, labels, questions, n_resamples, seed):
    """The people's win rates, position bias, agreement and repeat consistency, per question."""
    out = {"pairwise": {}, "position_bias": {}, "krippendorff_alpha": {}, "split_half": {}, "repeat_consistency": {}}
    first = by_question([r for r in rows if not r["repeat_of"]])
    for question, answers in [(q, first[q]) for q in questions if first[q]]:
        votes, present, _, _ = matrix(answers, lambda r: float(r["winner"] == labels[0]))
        out["pairwise"][question] = stats.win_rate(votes, present, labels, n_resamples, seed)
        left, present, _, _ = matrix(answers, lambda r: float(r["answer"] == "left"))
        out["position_bias"][question] = stats.left_rate(left, present, n_resamples, seed)
        reliability = np.where(present.T > 0, votes.T, np.nan)  # raters × items
        out["krippendorff_alpha"][question] = stats.krippendorff_alpha(reliability, "nominal")
        out["split_half"][question] = stats.split_half(votes, present, seed=seed)
    winners = {(r["task"], r["question"]): r["winner"] for r in rows}
    for question, answers in by_question([r for r in rows if r["repeat_of"]]).items():
        same = [winners[(r["repeat_of"], question)] == r["winner"] for r in answers
                if (r["repeat_of"], question) in winners]
        out["repeat_consistency"][question] = {"n": len(same), "same_winner": sum(same) / len(same) if same else None}
    return out


def judge_verdicts(rows):
    """{question: {item: (verdict of order 1, verdict of order 2)}} of one judge, each a label or None (missing)."""
    out = defaultdict(lambda: defaultdict(lambda: [None, None]))
    for r in rows:
        out[r["question"]][r["item"]][r["swapped"]] = r["winner"]
    return out


def combined(orders):
    """A judge's verdict on a pair from its two orders: the label both chose, or "tie" when they disagree."""
    return orders[0] if orders[0] == orders[1] else "tie"


def judge_pairwise(rows, labels, questions, n_pairs, n_resamples, seed):
    """A judge's win rates ({question: win_rate + order_agreement, first_position_rate, n_missing}) over the pairs,
    each pair's verdict combined from its two orders (disagreement: a tie); and {question: {item: verdict}}."""
    out, verdicts, found = {}, {}, judge_verdicts(rows)
    for question, per_item in [(q, found[q]) for q in questions if q in found]:
        complete = {item: o for item, o in per_item.items() if None not in o}
        verdicts[question] = {item: combined(o) for item, o in complete.items()}
        ids = sorted(complete)
        votes = np.array([[{labels[0]: 1.0, labels[1]: 0.0}.get(verdicts[question][i], 0.5)] for i in ids])
        entry = stats.win_rate(votes.reshape(-1, 1), np.ones((len(ids), 1)), labels, n_resamples, seed)
        answered = [r for r in rows if r["question"] == question]
        entry.update(order_agreement=(sum(o[0] == o[1] for o in complete.values()) / len(complete)
                                      if complete else None),
                     first_position_rate=(sum(r["answer"] == "left" for r in answered) / len(answered)
                                          if answered else None),
                     n_missing=n_pairs - len(complete))
        out[question] = entry
    return out, verdicts


def human_majority(rows, labels):
    """{question: {item: label | "tie"}}: the people's majority on each pair."""
    tally = defaultdict(lambda: defaultdict(list))
    for r in rows:
        tally[r["question"]][r["item"]].append(r["winner"] == labels[0])
    return {q: {item: labels[0] if np.mean(v) > 0.5 else labels[1] if np.mean(v) < 0.5 else "tie"
                for item, v in per_item.items()} for q, per_item in tally.items()}


def analyze_pairwise(rows, meta, n_resamples, seed):
    """Every statistic of a pairwise study (results.json's shape: docs/study.md)."""
    labels = meta["labels"]
    people = [r for r in rows if not is_judge(r["rater"])]
    gold = gold_report(people, meta)
    included = [r for r in people if not r["gold"] and r["rater"] not in gold["excluded"]]
    found = people_pairwise(included, labels, meta["questions"], n_resamples, seed)
    results = {"pairwise": found["pairwise"], "judge": {},
               "position_bias": {"people": found["position_bias"], "judges": {}},
               "agreement": {"krippendorff_alpha": found["krippendorff_alpha"], "split_half": found["split_half"],
                             "repeat_consistency": found["repeat_consistency"]},
               "gold": gold, "human_judge": {}}
    majority = human_majority([r for r in included if not r["repeat_of"]], labels)
    for judge in sorted({r["rater"] for r in rows if is_judge(r["rater"])}):
        name = judge[len(store.JUDGE_PREFIX):]
        mine = [r for r in rows if r["rater"] == judge]
        results["judge"][name], verdicts = judge_pairwise([r for r in mine if not r["gold"]], labels,
                                                          meta["questions"], meta["n_items"], n_resamples, seed)
        results["position_bias"]["judges"][name] = {q: {"first_position_rate": v["first_position_rate"]}
                                                    for q, v in results["judge"][name].items()}
        results["gold"].setdefault("judges", {})[name] = judge_gold(mine, meta)
        results["human_judge"][name] = {}
        for question, theirs in verdicts.items():
            both = sorted(set(theirs) & set(majority.get(question, {})))
            results["human_judge"][name][question] = {
                "n": len(both), "kappa": stats.cohen_kappa([majority[question][i] for i in both],
                                                           [theirs[i] for i in both]),
                "agreement": (sum(majority[question][i] == theirs[i] for i in both) / len(both)) if both else None}
    results["study"] = {"kind": "pairwise", "labels": labels, "questions": meta["questions"],
                        "n_items": meta["n_items"], "n_gold": meta.get("n_gold", 0),
                        "raters": sorted({r["rater"] for r in people}),
                        "raters_included": sorted({r["rater"] for r in included})}
    return results


#################################################################################
#                                    Patches                                    #
#################################################################################

def read_metric_csv(path, names):
    """{metric: {patch file name: value}} of a CSV with a `patch` column (the patch's file name) and one column per
    metric; UsageError naming the file when it does not fit."""
    if not Path(path).is_file():
        raise UsageError(f"--metric_csv {path}: no such file")
    rows = outputs.read_csv_rows(path)
    if not rows or "patch" not in rows[0]:
        raise UsageError(f"--metric_csv {path}: needs a header with a 'patch' column (the patch file names of "
                         f"patches.csv) and one column per metric")
    metrics = {}
    for column in [c for c in rows[0] if c != "patch"]:
        try:
            metrics[column] = {r["patch"]: float(r[column]) if r[column] != "" else np.nan for r in rows}
        except ValueError as error:
            raise UsageError(f"--metric_csv {path}: column {column!r} is not numeric ({error})") from None
    unknown = sorted(set(r["patch"] for r in rows) - set(names))
    if unknown:
        raise UsageError(f"--metric_csv {path}: {len(unknown)} patch(es) not in the study, e.g. {unknown[0]!r}")
    return metrics


def analyze_patches(rows, item_rows, meta, n_resamples, seed, extra_metrics=None):
    """Table 1's statistics: per-patch mean of per-rater z-scores, correlated (SRCC, PLCC) with each metric; the
    raters' agreement; per-label mean ratings; and the per-patch table."""
    people = [r for r in rows if not is_judge(r["rater"])]
    first = [r for r in people if not r["repeat_of"]]
    ratings, present, ids, raters = matrix(first, lambda r: float(r["rating"]))
    z = stats.zscores(ratings, present)
    info = {row["id"]: row for row in item_rows}
    metrics = {"glcm_score": [info[i]["glcm_score"] for i in ids],
               "compression_ratio_inverse": [info[i]["compressed_bytes"] / info[i]["raw_bytes"] for i in ids]}
    for name, values in (extra_metrics or {}).items():
        metrics[name] = [values.get(info[i]["name"], np.nan) for i in ids]
    correlations = stats.correlations(z, present, metrics, n_resamples, seed)
    complete = present.sum(1) == present.shape[1]
    icc_single, icc_average = stats.icc2(ratings[complete])
    reliability = np.where(present.T > 0, ratings.T, np.nan)
    by_label = {}
    for label in meta["labels"]:
        mine = np.array([info[i]["label"] == label for i in ids])
        if mine.any():
            by_label[label] = {"n_patches": int(mine.sum()),
                               "mean_rating": float(ratings[mine][present[mine] > 0].mean()),
                               "mean_rating_ci95": stats.interval(ratings[mine], present[mine], n_resamples, seed)}
    repeats = {r["task"]: r["rating"] for r in people}
    differences = [abs(r["rating"] - repeats[r["repeat_of"]]) for r in people if r["repeat_of"]
                   and r["repeat_of"] in repeats]
    table = []
    for k, i in enumerate(ids):
        rated = ratings[k][present[k] > 0]
        mos, ci = stats.t_interval(rated)
        table.append({"patch": info[i]["name"], "label": info[i]["label"], "source": info[i]["source"],
                      "x": info[i]["x"], "y": info[i]["y"], "n_ratings": len(rated), "mos": mos,
                      "mos_ci95_low": ci[0], "mos_ci95_high": ci[1],
                      "mos_z": float(np.nanmean(np.where(present[k] > 0, z[k], np.nan)))
                      if np.isfinite(z[k]).any() else None,
                      **{name: float(values[k]) for name, values in metrics.items()}})
    results = {"patches": {
        "n_patches": len(ids), "n_raters": len(raters), "zscored_per_rater": True,
        "score": "per patch: the mean over raters of each rater's z-scored rating (rating minus the rater's mean, "
                 "over the rater's standard deviation)",
        "correlations": correlations,
        "agreement": {"icc2_1": icc_single, "icc2_k": icc_average, "n_complete_patches": int(complete.sum()),
                      "krippendorff_alpha_interval": stats.krippendorff_alpha(reliability, "interval"),
                      "split_half": stats.split_half(np.nan_to_num(z), present * np.isfinite(z), seed=seed)},
        "repeat_mean_abs_difference": float(np.mean(differences)) if differences else None,
        "by_label": by_label},
        "study": {"kind": "patches", "labels": meta["labels"], "raters": raters}}
    return results, table, metrics


#################################################################################
#                                    Output                                     #
#################################################################################

def flat_rows(results):
    """results.csv: one row per number (with its interval when it has one)."""
    out = []

    def add(section, who, question, statistic, value, ci=(None, None), n=None):
        if isinstance(value, (int, float)) or value is None:
            out.append({"section": section, "who": who, "question": question, "statistic": statistic,
                        "value": "" if value is None else value, "ci95_low": "" if ci[0] is None else ci[0],
                        "ci95_high": "" if ci[1] is None else ci[1], "n": "" if n is None else n})

    for question, v in results.get("pairwise", {}).items():
        add("pairwise", "people", question, "win_rate_a", v["win_rate_a"], v["win_rate_a_ci95"], v["n"])
        add("pairwise", "people", question, "win_rate_a_without_ties", v["win_rate_a_without_ties"],
            v["win_rate_a_without_ties_ci95"], v["wins_a"] + v["wins_b"])
    for name, per_question in results.get("judge", {}).items():
        for question, v in per_question.items():
            add("judge", name, question, "win_rate_a", v["win_rate_a"], v["win_rate_a_ci95"], v["n"])
            add("judge", name, question, "win_rate_a_without_ties", v["win_rate_a_without_ties"],
                v["win_rate_a_without_ties_ci95"], v["wins_a"] + v["wins_b"])
            add("judge", name, question, "tie_rate", v["tie_rate"], n=v["n"])
            add("judge", name, question, "order_agreement", v["order_agreement"], n=v["n"])
            add("judge", name, question, "first_position_rate", v["first_position_rate"])
    for question, v in results.get("position_bias", {}).get("people", {}).items():
        add("position_bias", "people", question, "left_rate", v["left_rate"], v["left_rate_ci95"], v["n"])
    for statistic in ("krippendorff_alpha", "split_half"):
        for question, value in results.get("agreement", {}).get(statistic, {}).items():
            add("agreement", "people", question, statistic, value)
    for rater, v in results.get("gold", {}).get("raters", {}).items():
        add("gold", rater, "", "pass_rate", v["pass_rate"], n=v["n"])
    for name, per_question in results.get("human_judge", {}).items():
        for question, v in per_question.items():
            add("human_judge", name, question, "cohen_kappa", v["kappa"], n=v["n"])
    patches = results.get("patches")
    if patches:
        for metric, v in patches["correlations"].items():
            add("patches", "people", metric, "srcc", v["srcc"], v["srcc_ci95"], v["n"])
            add("patches", "people", metric, "plcc", v["plcc"], v["plcc_ci95"], v["n"])
            add("patches", "people", metric, "srcc_p_value", v["p_value"], n=v["n"])
        for statistic, value in patches["agreement"].items():
            add("patches", "people", "", statistic, value)
        for label, v in patches["by_label"].items():
            add("patches", label, "", "mean_rating", v["mean_rating"], v["mean_rating_ci95"], v["n_patches"])
    return out


def clean(value):
    """JSON-ready: numpy numbers as Python numbers, NaN as null, intervals through json_interval."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        if len(value) == 2 and all(v is None or isinstance(v, float) for v in value):
            return json_interval(value)
        return [clean(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if np.isnan(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def run(args):
    """Read the study, compute everything, write the files, print where they are."""
    conn = store.connect(args.study)
    meta = store.read_meta(conn)
    rows = store.answer_rows(conn)
    if not rows:
        raise UsageError(f"{args.study} has no answers yet: serve it to raters (or run the judge) first")
    out = outputs.make_writable_folder(args.out, "--out")
    if meta["kind"] == "pairwise":
        results = analyze_pairwise(rows, meta, args.bootstrap, args.bootstrap_seed)
    else:
        item_rows = store.items(conn)
        extra = read_metric_csv(args.metric_csv, [row["name"] for row in item_rows]) if args.metric_csv else None
        results, table, metrics = analyze_patches(rows, item_rows, meta, args.bootstrap, args.bootstrap_seed, extra)
        outputs.write_csv(out / "patches.csv", table, PATCH_COLUMNS + tuple(metrics))
        plots.correlation_plot(table, list(metrics), results["patches"]["correlations"], out / "correlation.png")
    results["study"].update(bootstrap=args.bootstrap, bootstrap_seed=args.bootstrap_seed,
                            judge_errors=len(store.judge_errors(conn)))
    results = clean(results)
    outputs.write_json(out / "results.json", results)
    outputs.write_csv(out / "results.csv", flat_rows(results), RESULT_COLUMNS)
    if meta["kind"] == "pairwise":
        plots.preference_plot(results, out / "preference.png")
    print(f"results in {out}: results.json, results.csv, "
          f"{'preference.png' if meta['kind'] == 'pairwise' else 'patches.csv, correlation.png'}", file=sys.stderr)
    return results
