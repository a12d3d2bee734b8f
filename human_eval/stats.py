"""The study's statistics (PROTOCOL.md §12), on matrices of items (prompts, patches) × raters with a 0/1 mask of the
cells answered: win rates with a bootstrap that resamples prompts and raters together, Krippendorff's alpha,
split-half reliability, Cohen's kappa, per-rater z-scores, SRCC / PLCC with intervals and p-values, ICC(2,1)/(2,k).

The two-way bootstrap draws the items and the raters with replacement, independently; a replicate weighs cell (i, r)
by (times item i was drawn) × (times rater r was drawn), so one matrix product gives every replicate at once.
"""
import numpy as np
from scipy import stats as distributions  # correlations, the t distribution and the binomial test

from bootstrap import percentile_interval, resample_counts

LEVELS = ("nominal", "ordinal", "interval")


#################################################################################
#                      Win rates and the two-way bootstrap                      #
#################################################################################

def two_way_means(values, present, n_resamples, seed):
    """Replicates of Σ present·values / Σ present (items × raters) with items and raters both resampled."""
    values, present = np.nan_to_num(np.asarray(values, float)), np.asarray(present, float)
    rng = np.random.default_rng(seed)
    items = resample_counts(values.shape[0], n_resamples, rng).astype(float)
    raters = resample_counts(values.shape[1], n_resamples, rng).astype(float)
    total = ((items @ (values * present)) * raters).sum(1)
    count = ((items @ present) * raters).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return total / count


def interval(values, present, n_resamples, seed):
    """The 95 % two-way bootstrap interval of the mean of the answered cells, or [None, None] (no resampling)."""
    if not n_resamples or not np.asarray(present).sum():
        return [None, None]
    return percentile_interval(two_way_means(values, present, n_resamples, seed))


def excludes(ci, value):
    """Whether an interval excludes `value` (a degenerate [x, x] holds x); None without an interval."""
    return None if None in ci else not (ci[0] <= value <= ci[1])


def win_rate(votes, present, labels, n_resamples, seed):
    """Fig. 6's statistic for items × raters votes (1: a won, 0: b won, 0.5: a tie): counts, win_rate_a =
    (wins_a + ties / 2) / n, its interval (prompts and raters resampled) and whether the interval excludes 0.5; beside
    it the other definition in use, ties left out (wins_a / (wins_a + wins_b), with its interval), and the tie rate."""
    votes, present = np.asarray(votes, float), np.asarray(present, float)
    answered = votes[present > 0]
    n, wins_a, wins_b = len(answered), int((answered == 1).sum()), int((answered == 0).sum())
    ci = interval(votes, present, n_resamples, seed)
    decided = n - (n - wins_a - wins_b)
    return {"a": labels[0], "b": labels[1], "n": n, "wins_a": wins_a, "wins_b": wins_b, "ties": n - wins_a - wins_b,
            "win_rate_a": (wins_a + (n - wins_a - wins_b) / 2) / n if n else None, "win_rate_a_ci95": ci,
            "significant": excludes(ci, 0.5), "tie_rate": (n - wins_a - wins_b) / n if n else None,
            "win_rate_a_without_ties": wins_a / decided if decided else None,
            "win_rate_a_without_ties_ci95": interval(votes, present * (votes != 0.5), n_resamples, seed)}


def left_rate(left, present, n_resamples, seed):
    """Position bias: the share of answers choosing the left (first) image, its interval and the two-sided binomial
    p-value against ½ (sides are balanced, so an unbiased rater chooses left half the time)."""
    left, present = np.asarray(left, float), np.asarray(present, float)
    n, k = int(present.sum()), int((left * present).sum())
    return {"n": n, "left": k, "left_rate": k / n if n else None, "left_rate_ci95": interval(left, present,
                                                                                            n_resamples, seed),
            "p_value": float(distributions.binomtest(k, n, 0.5).pvalue) if n else None}


#################################################################################
#                                   Agreement                                   #
#################################################################################

def distances(values, totals, level):
    """Krippendorff's squared difference δ²(c, k) between the values taken (sorted), for `level`; totals: n_c."""
    c, k = np.meshgrid(values, values, indexing="ij")
    if level == "nominal":
        return (c != k).astype(float)
    if level == "interval":
        return (c - k) ** 2
    if level == "ordinal":  # (Σ_{g between c and k} n_g − (n_c + n_k) / 2)², on the ranks of the values
        cumulative = np.concatenate([[0.0], np.cumsum(totals)])
        i, j = np.meshgrid(np.arange(len(values)), np.arange(len(values)), indexing="ij")
        low, high = np.minimum(i, j), np.maximum(i, j)
        return (cumulative[high + 1] - cumulative[low] - (totals[i] + totals[j]) / 2) ** 2
    raise ValueError(f"unknown level {level!r}; choose one of {LEVELS}")


def krippendorff_alpha(data, level="nominal"):
    """Krippendorff's alpha of raters × units data (NaN: no value) = 1 − D_o / D_e, from the coincidence matrix of
    the values within each unit that has at least two (units with fewer are not pairable and are left out)."""
    data = np.asarray(data, float)
    values = np.unique(data[~np.isnan(data)])
    if len(values) < 2:
        return None
    counts = np.stack([(data == v).sum(0) for v in values], 1).astype(float)  # units × values
    m = counts.sum(1)
    counts, m = counts[m >= 2], m[m >= 2]
    if not len(m):
        return None
    coincidence = ((counts / (m - 1)[:, None]).T @ counts) - np.diag((counts / (m - 1)[:, None]).sum(0))
    totals = coincidence.sum(1)
    n = totals.sum()
    delta = distances(values, totals, level)
    expected = (np.outer(totals, totals) * delta).sum() / (n * (n - 1))
    return None if expected == 0 else float(1 - (coincidence * delta).sum() / n / expected)


def split_half(values, present, n_splits=200, seed=0):
    """Split-half reliability: the raters split at random into two halves, the correlation of the two halves'
    per-item means (over items answered in both), averaged over `n_splits` splits to r, then stepped up by
    Spearman–Brown to the reliability of all the raters' mean, 2r / (1 + r). None with fewer than two raters or
    three items."""
    values, present = np.asarray(values, float), np.asarray(present, float)
    n_raters = values.shape[1]
    if n_raters < 2:
        return None
    rng, found = np.random.default_rng(seed), []
    for _ in range(n_splits):
        order = rng.permutation(n_raters)
        means = []
        for half in (order[:n_raters // 2], order[n_raters // 2:]):
            with np.errstate(invalid="ignore", divide="ignore"):
                means.append((np.nan_to_num(values[:, half]) * present[:, half]).sum(1) / present[:, half].sum(1))
        keep = np.isfinite(means[0]) & np.isfinite(means[1])
        if keep.sum() < 3 or min(np.std(means[0][keep]), np.std(means[1][keep])) == 0:
            continue
        found.append(np.corrcoef(means[0][keep], means[1][keep])[0, 1])
    r = float(np.mean(found)) if found else None
    return None if r is None or r <= -1 else 2 * r / (1 + r)


def cohen_kappa(x, y):
    """Cohen's kappa of two raters' labels of the same items: (p_o − p_e) / (1 − p_e); None when undefined."""
    x, y = list(x), list(y)
    if not x:
        return None
    categories = sorted(set(x) | set(y))
    index = {c: k for k, c in enumerate(categories)}
    table = np.zeros((len(categories), len(categories)))
    np.add.at(table, ([index[v] for v in x], [index[v] for v in y]), 1)
    table /= table.sum()
    observed, expected = np.trace(table), table.sum(1) @ table.sum(0)
    return None if expected == 1 else float((observed - expected) / (1 - expected))


def icc2(ratings):
    """(ICC(2,1), ICC(2,k)) of a complete items × raters matrix: two-way random effects, absolute agreement
    (Shrout & Fleiss 1979), from the two-way ANOVA mean squares; (None, None) below two items or raters."""
    x = np.asarray(ratings, float)
    n, k = x.shape
    if n < 2 or k < 2:
        return None, None
    grand, rows, cols = x.mean(), x.mean(1), x.mean(0)
    ms_rows = k * ((rows - grand) ** 2).sum() / (n - 1)
    ms_cols = n * ((cols - grand) ** 2).sum() / (k - 1)
    ms_error = ((x - rows[:, None] - cols[None, :] + grand) ** 2).sum() / ((n - 1) * (k - 1))
    single = (ms_rows - ms_error) / (ms_rows + (k - 1) * ms_error + k * (ms_cols - ms_error) / n)
    average = (ms_rows - ms_error) / (ms_rows + (ms_cols - ms_error) / n)
    return float(single), float(average)


#################################################################################
#                           Ratings and correlations                            #
#################################################################################

def zscores(ratings, present):
    """Each rater's ratings minus their mean, over their standard deviation (ddof 1), on the cells they rated; a
    rater with fewer than two ratings, or one value for everything, gets NaN (no information on the scale)."""
    ratings, present = np.asarray(ratings, float), np.asarray(present) > 0
    z = np.full(ratings.shape, np.nan)
    for r in range(ratings.shape[1]):
        mine = ratings[present[:, r], r]
        if len(mine) >= 2 and mine.std() > 0:
            z[present[:, r], r] = (mine - mine.mean()) / mine.std(ddof=1)
    return z


def correlation(kind, x, y, with_p_value=True):
    """(r, two-sided p-value against 0 or None) of Spearman's ("srcc": Pearson's r of the ranks, ties given their
    average rank) or Pearson's ("plcc") correlation, from scipy and NumPy; (None, None) below three pairs or when
    either side is constant. The bootstrap asks without the p-value (NumPy's corrcoef: a sixth of pearsonr's time)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None, None
    if kind == "srcc":
        x, y = distributions.rankdata(x), distributions.rankdata(y)
    if not with_p_value:
        return float(np.corrcoef(x, y)[0, 1]), None
    found = distributions.pearsonr(x, y)
    return float(found.statistic), float(found.pvalue)


def mean_scores(values, present, rater_weights):
    """Per-item means over the raters, each rater weighted (rater_weights: raters × B) -> items × B; NaN: unrated."""
    values, present = np.nan_to_num(np.asarray(values, float)), np.asarray(present, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((values * present) @ rater_weights) / (present @ rater_weights)


def correlations(z, present, metrics, n_resamples, seed):
    """{metric: {"srcc", "srcc_ci95", "plcc", "plcc_ci95", "p_value", "plcc_p_value", "n"}} between the items' mean
    z-score and each metric (items × 1 values; NaN left out). Intervals: patches and raters resampled together."""
    present = np.asarray(present, float) * np.isfinite(z)
    mos = mean_scores(z, present, np.ones((z.shape[1], 1)))[:, 0]
    out = {}
    for name, metric in metrics.items():
        metric = np.asarray(metric, float)
        keep = np.isfinite(mos) & np.isfinite(metric)
        (srcc, srcc_p), (plcc, plcc_p) = (correlation(kind, mos[keep], metric[keep]) for kind in ("srcc", "plcc"))
        out[name] = {"n": int(keep.sum()), "srcc": srcc, "srcc_ci95": [None, None], "plcc": plcc,
                     "plcc_ci95": [None, None], "p_value": srcc_p, "plcc_p_value": plcc_p}
    if not n_resamples:
        return out
    rng = np.random.default_rng(seed)
    replicated = mean_scores(z, present, resample_counts(z.shape[1], n_resamples, rng).T.astype(float))
    draws = rng.integers(0, z.shape[0], size=(n_resamples, z.shape[0]))
    for name, metric in metrics.items():
        metric, found = np.asarray(metric, float), {"srcc": [], "plcc": []}
        for b, rows in enumerate(draws):
            m, x = replicated[rows, b], metric[rows]
            keep = np.isfinite(m) & np.isfinite(x)
            for key in ("srcc", "plcc"):
                r = correlation(key, m[keep], x[keep], with_p_value=False)[0]
                found[key].append(np.nan if r is None else r)
        out[name].update(srcc_ci95=percentile_interval(found["srcc"]), plcc_ci95=percentile_interval(found["plcc"]))
    return out


def t_interval(values):
    """(mean, [low, high]) of a sample with Student's t 95 % interval ([None, None] below two values)."""
    values = np.asarray(values, float)
    if len(values) < 2:
        return (float(values.mean()) if len(values) else None), [None, None]
    half = distributions.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return float(values.mean()), [float(values.mean() - half), float(values.mean() + half)]
