"""The study's statistics against independent references: the `krippendorff` package, scipy's correlations and
p-values, Shrout & Fleiss's published ICC example, a textbook Cohen's kappa, split-half reliability against its
theory, and simulated raters for the intervals' coverage (a win rate's bootstrap must resample prompts and raters)."""
import krippendorff
import numpy as np
import pytest
from scipy import stats as scipy_stats
from scipy.stats import norm

from human_eval import stats

N_SIMULATIONS = 300


#################################################################################
#                                   Agreement                                   #
#################################################################################

@pytest.mark.parametrize("level", stats.LEVELS)
def test_krippendorffs_alpha_equals_the_krippendorff_package_with_missing_values(level):
    rng = np.random.default_rng(4)
    for trial in range(5):
        truth = rng.integers(1, 6, 40)
        data = np.where(rng.random((6, 40)) < 0.6, truth, rng.integers(1, 6, (6, 40))).astype(float)
        data[rng.random(data.shape) < 0.25] = np.nan
        data[:, 0] = np.nan  # a unit nobody rated
        data[1:, 1] = np.nan  # a unit with one value: not pairable
        expected = krippendorff.alpha(reliability_data=data, level_of_measurement=level)
        assert stats.krippendorff_alpha(data, level) == pytest.approx(expected, abs=1e-12)


def test_shrout_and_fleiss_published_example_gives_their_icc_2_1_and_2_k():
    # Shrout & Fleiss (1979), Table 2: 6 targets rated by 4 judges; ICC(2,1) = .29, ICC(2,4) = .62.
    ratings = [[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]]
    single, average = stats.icc2(ratings)
    assert round(single, 2) == 0.29 and round(average, 2) == 0.62


def test_icc_recovers_the_variance_components_of_simulated_ratings():
    rng = np.random.default_rng(0)
    items, raters = rng.normal(0, 1.0, (2000, 1)), rng.normal(0, 0.5, (1, 6))
    ratings = items + raters + rng.normal(0, 0.8, (2000, 6))
    single, average = stats.icc2(ratings)
    rater_variance = np.var(raters, ddof=1)  # the raters drawn, as the ANOVA sees them
    expected = 1.0 / (1.0 + rater_variance + 0.64)
    assert single == pytest.approx(expected, abs=0.03)
    assert average == pytest.approx(6 * expected / (1 + 5 * expected), abs=0.02)


def test_cohens_kappa_of_the_textbook_example_and_a_three_category_table_written_out():
    # 50 items: both yes 20, first yes second no 5, first no second yes 10, both no 15: kappa = 0.4.
    first = ["yes"] * 25 + ["no"] * 25
    second = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert stats.cohen_kappa(first, second) == pytest.approx(0.4, abs=1e-12)
    rng = np.random.default_rng(1)
    x = rng.choice(["a", "b", "tie"], 200, p=[0.5, 0.3, 0.2])
    y = np.where(rng.random(200) < 0.6, x, rng.choice(["a", "b", "tie"], 200))
    observed = np.mean(x == y)
    expected = sum(np.mean(x == c) * np.mean(y == c) for c in ("a", "b", "tie"))
    assert stats.cohen_kappa(x, y) == pytest.approx((observed - expected) / (1 - expected), abs=1e-12)
    assert stats.cohen_kappa(["a"] * 5, ["a"] * 5) is None  # undefined when both always say the same


def test_split_half_reliability_matches_spearman_brown_theory():
    rng = np.random.default_rng(2)
    n_items, n_raters, noise = 600, 8, 1.5
    values = rng.normal(size=(n_items, 1)) + rng.normal(0, noise, (n_items, n_raters))
    theory = 1 / (1 + noise ** 2 / n_raters)  # reliability of the mean of all raters
    assert stats.split_half(values, np.ones_like(values), seed=0) == pytest.approx(theory, abs=0.03)
    assert stats.split_half(rng.normal(size=(600, 8)), np.ones((600, 8)), seed=0) == pytest.approx(0, abs=0.1)


#################################################################################
#                                 Correlations                                  #
#################################################################################

def test_srcc_and_plcc_are_scipys_and_undefined_below_three_pairs_or_on_constant_input():
    rng = np.random.default_rng(3)
    x = np.round(rng.normal(size=60), 1)  # ties
    y = x + rng.normal(size=60)
    srcc, plcc = stats.correlation("srcc", x, y), stats.correlation("plcc", x, y)
    assert srcc == pytest.approx(tuple(scipy_stats.spearmanr(x, y)), rel=1e-12)
    assert plcc == pytest.approx(tuple(scipy_stats.pearsonr(x, y)), rel=1e-12)
    assert srcc[0] != pytest.approx(plcc[0], abs=1e-3)  # the two kinds differ on these data
    for kind, found in (("srcc", srcc), ("plcc", plcc)):  # the bootstrap's way: the same r, no p-value
        assert stats.correlation(kind, x, y, with_p_value=False) == (pytest.approx(found[0], abs=1e-12), None)
    assert stats.correlation("srcc", x[:2], y[:2]) == (None, None)
    assert stats.correlation("plcc", np.ones(10), y[:10]) == (None, None)


def test_each_correlation_interval_is_bootstrapped_with_its_own_kind():
    """A monotone but far from linear metric: SRCC near 1, PLCC well below; each interval holds its own estimate."""
    rng = np.random.default_rng(4)
    score = rng.normal(size=60)
    z = score[:, None] + rng.normal(0, 0.1, (60, 3))
    found = stats.correlations(z, np.ones((60, 3)), {"m": np.exp(3 * score)}, 300, 0)["m"]
    assert found["srcc"] - found["plcc"] > 0.2
    for kind, other in (("srcc", "plcc"), ("plcc", "srcc")):
        low, high = found[f"{kind}_ci95"]
        assert low <= found[kind] <= high and not low <= found[other] <= high, (kind, found)


def test_z_scores_are_per_rater_and_leave_out_a_rater_without_spread():
    ratings = np.array([[1, 5, 7], [2, 5, 9], [3, 5, 8], [4, 5, 0]], float)
    present = np.array([[1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 0]], float)
    z = stats.zscores(ratings, present)
    assert np.allclose(z[:, 0], scipy_stats.zscore([1, 2, 3, 4], ddof=1))
    assert np.isnan(z[:, 1]).all()  # one value for everything: no scale
    assert np.allclose(z[:3, 2], scipy_stats.zscore([7, 9, 8], ddof=1)) and np.isnan(z[3, 2])


def simulate_patches(rng, n_patches=60, n_raters=5, metric_noise=0.8, rater_noise=1.0):
    """Ratings of simulated raters (each with their own offset and scale) of patches with a true detail d, and a
    metric d + noise. Returns (ratings, present, metric, the population PLCC between the metric and the mean of
    n_raters raters' z-scores, which z-scoring leaves at corr(metric, d + mean noise))."""
    detail = rng.normal(size=n_patches)
    offsets, scales = rng.normal(5, 1, n_raters), rng.uniform(0.5, 2, n_raters)
    ratings = offsets + scales * (detail[:, None] + rng.normal(0, rater_noise, (n_patches, n_raters)))
    metric = detail + rng.normal(0, metric_noise, n_patches)
    truth = 1 / np.sqrt((1 + metric_noise ** 2) * (1 + rater_noise ** 2 / n_raters))
    return ratings, np.ones_like(ratings), metric, truth


def test_correlation_intervals_widen_when_raters_disagree_about_the_same_mean_scores():
    """Two panels give every patch the same mean score; in one the raters agree, in the other they disagree by
    amounts that cancel in the mean. Only resampling the raters can tell them apart: the second interval is wider."""
    rng = np.random.default_rng(6)
    score = rng.normal(size=80)
    metric = score + rng.normal(0, 1.0, 80)
    agree = np.repeat(score[:, None], 4, axis=1)
    u, v = rng.normal(0, 1.5, 80), rng.normal(0, 1.5, 80)
    disagree = np.stack([score + u, score - u, score + v, score - v], axis=1)
    present = np.ones((80, 4))
    width = {}
    for name, z in (("agree", agree), ("disagree", disagree)):
        found = stats.correlations(z, present, {"m": metric}, 500, 0)["m"]
        assert found["plcc"] == pytest.approx(scipy_stats.pearsonr(score, metric).statistic, abs=1e-12)
        width[name] = {k: found[f"{k}_ci95"][1] - found[f"{k}_ci95"][0] for k in ("srcc", "plcc")}
    assert all(width["disagree"][k] > 1.5 * width["agree"][k] for k in ("srcc", "plcc")), width


def test_correlation_intervals_cover_the_population_correlation_of_simulated_raters():
    rng = np.random.default_rng(5)
    hits = {"plcc": 0, "srcc": 0}
    for trial in range(150):
        ratings, present, metric, plcc = simulate_patches(rng)
        found = stats.correlations(stats.zscores(ratings, present), present, {"m": metric}, 200, trial)["m"]
        srcc = 6 / np.pi * np.arcsin(plcc / 2)  # Spearman's of a bivariate normal with Pearson's plcc
        hits["plcc"] += found["plcc_ci95"][0] <= plcc <= found["plcc_ci95"][1]
        hits["srcc"] += found["srcc_ci95"][0] <= srcc <= found["srcc_ci95"][1]
    print({k: v / 150 for k, v in hits.items()})
    assert all(v / 150 >= 0.88 for v in hits.values()), hits


#################################################################################
#                                   Win rates                                   #
#################################################################################

def test_win_rate_counts_ties_as_half_and_a_degenerate_interval_holds_its_value():
    votes = np.array([[1, 0.5], [1, 1], [0, 1]], float)
    present = np.array([[1, 1], [1, 1], [1, 0]], float)
    found = stats.win_rate(votes, present, ["a", "b"], 0, 0)
    assert (found["n"], found["wins_a"], found["wins_b"], found["ties"]) == (5, 3, 1, 1)
    assert found["win_rate_a"] == pytest.approx(3.5 / 5) and found["significant"] is None
    assert found["win_rate_a_without_ties"] == pytest.approx(3 / 4) and found["tie_rate"] == pytest.approx(1 / 5)


def test_the_win_rate_without_ties_has_the_interval_of_the_decided_answers_alone():
    """A judge-like column (one rater): 20 ties, 15 wins of a, 5 of b. Reference: the percentile bootstrap of
    wins_a / (wins_a + wins_b) over the prompts, written out with numpy."""
    votes = np.array([0.5] * 20 + [1.0] * 15 + [0.0] * 5).reshape(-1, 1)
    found = stats.win_rate(votes, np.ones_like(votes), ["a", "b"], 4000, 0)
    assert (found["win_rate_a"], found["win_rate_a_without_ties"], found["tie_rate"]) == (0.625, 0.75, 0.5)
    draws = votes[np.random.default_rng(1).integers(0, 40, (4000, 40)), 0]
    rates = (draws == 1).sum(1) / (draws != 0.5).sum(1)
    assert np.allclose(found["win_rate_a_without_ties_ci95"], np.percentile(rates, [2.5, 97.5]), atol=0.03)
    assert np.allclose(found["win_rate_a_ci95"], np.percentile(np.where(draws == 0.5, 0.5, draws).mean(1), [2.5, 97.5]),
                       atol=0.03)
    assert stats.excludes([0.5, 0.5], 0.5) is False and stats.excludes([1.0, 1.0], 0.5) is True
    assert stats.excludes([0.51, 0.7], 0.5) is True and stats.excludes([0.3, 0.5], 0.5) is False


def coverage(n_items, n_raters, prompt_sd, rater_sd, mu=0.3):
    """Share of simulated studies whose interval holds the population win rate. Votes: P(a wins) = Φ(μ + u_i + v_r),
    u_i ~ N(0, prompt_sd²) per prompt, v_r ~ N(0, rater_sd²) per rater, so the population rate is
    Φ(μ / √(1 + prompt_sd² + rater_sd²)): the question a study asks is about prompts and raters beyond its own."""
    rng = np.random.default_rng(11)
    truth = norm.cdf(mu / np.sqrt(1 + prompt_sd ** 2 + rater_sd ** 2))
    hits = 0
    for trial in range(N_SIMULATIONS):
        p = norm.cdf(mu + rng.normal(0, prompt_sd, (n_items, 1)) + rng.normal(0, rater_sd, (1, n_raters)))
        votes = (rng.random((n_items, n_raters)) < p).astype(float)
        low, high = stats.win_rate(votes, np.ones_like(votes), ["a", "b"], 200, trial)["win_rate_a_ci95"]
        hits += low <= truth <= high
    return hits / N_SIMULATIONS


@pytest.mark.parametrize("n_items, n_raters, prompt_sd, rater_sd, minimum", [
    (40, 8, 1.0, 0.1, 0.90),  # prompts differ, raters agree: two-way 0.977; resampling only raters 0.577
    (40, 10, 0.1, 1.0, 0.88),  # raters differ, prompts alike: two-way 0.940; resampling only prompts 0.303
], ids=["prompts-vary", "raters-vary"])
def test_win_rate_intervals_cover_the_population_when_prompts_or_raters_vary(n_items, n_raters, prompt_sd, rater_sd,
                                                                            minimum):
    found = coverage(n_items, n_raters, prompt_sd, rater_sd)
    print(f"coverage {found:.3f}")
    assert found >= minimum


def test_position_bias_is_the_left_share_with_an_exact_binomial_p_value():
    left = np.array([[1, 1, 0], [1, 0, 1], [0, 1, 1], [1, 1, 1]], float)
    found = stats.left_rate(left, np.ones_like(left), 200, 0)
    assert (found["n"], found["left"]) == (12, 9) and found["left_rate"] == 0.75
    assert found["p_value"] == pytest.approx(scipy_stats.binomtest(9, 12, 0.5).pvalue)
    assert found["p_value"] == pytest.approx(2 * sum(scipy_stats.binom.pmf(k, 12, 0.5) for k in range(9, 13)))
