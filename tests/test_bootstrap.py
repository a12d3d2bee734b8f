"""bootstrap.py and patch_fid.py: intervals against analytical ones, FID against scipy's Fréchet distance, crops."""
import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

import bootstrap
from bench.bench_coverage import Scenario
from errors import UsageError
from patch_fid import image_patches, patch_boxes, recorded_features


def direct_fid(real, generated):
    """The textbook Fréchet distance: numpy means and covariances, scipy's matrix square root."""
    mu1, mu2 = real.mean(0), generated.mean(0)
    s1, s2 = np.cov(real, rowvar=False), np.cov(generated, rowvar=False)
    root = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(root))


def features(n, d, seed, scale=1.0, shift=0.0):
    """Correlated non-negative features (like Inception pool features), n × d."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d)) * 0.8 ** np.arange(d)
    return np.abs(rng.normal(size=(n, d)) @ mixing.T) * scale + shift


# ------------------------------------------------------------------ resampling and simple statistics


def test_resample_counts_are_draws_with_replacement():
    counts = bootstrap.resample_counts(50, 400, np.random.default_rng(0))
    assert counts.shape == (400, 50) and (counts.sum(1) == 50).all()
    draws = np.random.default_rng(0).integers(0, 50, size=(400, 50))  # the same stream, counted directly
    assert np.array_equal(counts, np.stack([np.bincount(row, minlength=50) for row in draws]))
    # A draw with replacement keeps 1 − (1 − 1/n)^n ≈ 63.6 % of the items.
    assert (counts > 0).mean() == pytest.approx(1 - (1 - 1 / 50) ** 50, abs=0.01)


def test_mean_interval_of_normal_samples_matches_the_analytical_interval():
    values = np.random.default_rng(1).normal(3.0, 2.0, size=2000)
    low, high = bootstrap.mean_ci(values, n_resamples=4000, seed=0)
    half = 1.959964 * values.std(ddof=1) / np.sqrt(len(values))
    assert (low + high) / 2 == pytest.approx(values.mean(), abs=0.1 * half)
    assert (high - low) / 2 == pytest.approx(half, rel=0.08)


def test_ratio_interval_matches_the_delta_method():
    rng = np.random.default_rng(2)
    raw = rng.uniform(1e6, 3e6, size=1500)
    compressed = raw / rng.normal(10, 2, size=1500).clip(3)
    low, high = bootstrap.ratio_ci(raw, compressed, n_resamples=4000, seed=0)
    ratio = raw.sum() / compressed.sum()
    # Delta method for Σx / Σy: var ≈ var(x − R y) / (n ȳ²).
    half = 1.959964 * np.std(raw - ratio * compressed, ddof=1) / np.sqrt(len(raw)) / compressed.mean()
    assert (low + high) / 2 == pytest.approx(ratio, abs=0.15 * half)
    assert (high - low) / 2 == pytest.approx(half, rel=0.08)


def test_paired_difference_matches_the_paired_normal_interval_and_is_exact_for_identical_sets():
    rng = np.random.default_rng(3)
    a = rng.normal(0.7, 0.1, size=1000)
    b = a + rng.normal(0.01, 0.05, size=1000)
    diff, (low, high) = bootstrap.paired_difference(a, b, n_resamples=4000)
    d = b - a
    half = 1.959964 * d.std(ddof=1) / np.sqrt(len(d))
    assert diff == pytest.approx(d.mean(), rel=1e-12)
    assert (high - low) / 2 == pytest.approx(half, rel=0.08)
    assert bootstrap.paired_difference(a, a.copy()) == (0.0, [0.0, 0.0])
    # The unpaired interval would be ~2× wider here: pairing is what makes the small shift visible.
    assert low > 0


def test_add_intervals_writes_ci_keys_only_when_asked_and_null_for_no_data():
    summary = bootstrap.add_intervals({"glcm_score": 0.5}, 0, 0, means={"glcm_score": [0.4, 0.6]})
    assert summary == {"glcm_score": 0.5, "bootstrap": 0}
    summary = bootstrap.add_intervals({}, 100, 7, means={"glcm_score": [float("nan")] * 3, "psnr": [20.0, 30.0, 25.0]})
    assert summary["glcm_score_ci95"] == [None, None] and summary["bootstrap"] == 100 and summary["bootstrap_seed"] == 7
    assert 20.0 <= summary["psnr_ci95"][0] <= summary["psnr_ci95"][1] <= 30.0
    assert bootstrap.add_intervals({}, 100, 7, means={"psnr": [20.0, 30.0, 25.0]}) == {
        k: v for k, v in summary.items() if k != "glcm_score_ci95"}  # seeded: the same interval again


# ------------------------------------------------------------------ FID


@pytest.mark.parametrize("n_real, n_gen, d", [(60, 45, 16), (40, 70, 96)])  # fewer images than features, too
def test_fid_of_features_equals_scipy_frechet_distance(n_real, n_gen, d):
    real, gen = features(n_real, d, 0), features(n_gen, d, 1, scale=1.1, shift=0.05)
    fid = bootstrap.FidBootstrap(real, gen)
    assert fid.fid() == pytest.approx(direct_fid(real, gen), rel=1e-6)
    rng = np.random.default_rng(5)
    for _ in range(3):  # a resample = the textbook FID of the drawn rows, duplicates included
        w_r, w_g = bootstrap.resample_counts(n_real, 1, rng)[0], bootstrap.resample_counts(n_gen, 1, rng)[0]
        expected = direct_fid(np.repeat(real, w_r, axis=0), np.repeat(gen, w_g, axis=0))
        assert fid.fid(w_r, w_g) == pytest.approx(expected, rel=1e-6)


def test_covariance_path_for_large_sets_equals_the_gram_path(monkeypatch):
    real, gen = features(50, 12, 2), features(40, 12, 3, shift=0.1)
    w_r, w_g = (bootstrap.resample_counts(n, 1, np.random.default_rng(n))[0] for n in (50, 40))
    gram = bootstrap.FidBootstrap(real, gen).fid(w_r, w_g)
    monkeypatch.setattr(bootstrap, "GRAM_LIMIT", 10)
    covariance = bootstrap.FidBootstrap(real, gen)
    assert not covariance.use_gram
    assert covariance.fid(w_r, w_g) == pytest.approx(gram, rel=1e-6)
    assert bootstrap.frechet_distance(real.mean(0), np.cov(real, rowvar=False), gen.mean(0),
                                      np.cov(gen, rowvar=False)) == pytest.approx(direct_fid(real, gen), rel=1e-6)


def test_fid_interval_is_centred_on_the_point_and_reflects_the_spread_of_the_replicates():
    real, gen = features(80, 8, 4), features(80, 8, 5, scale=1.3)
    point, (low, high) = bootstrap.fid_ci(real, gen, n_resamples=300, seed=0)
    assert point == pytest.approx(direct_fid(real, gen), rel=1e-6)
    assert low < point < high
    again = bootstrap.fid_ci(real, gen, n_resamples=300, seed=0)
    other = bootstrap.fid_ci(real, gen, n_resamples=300, seed=1)
    assert again == (point, [low, high]) and other[1] != [low, high]  # seeded


def test_fid_interval_equals_the_bootstrap_written_out_with_scipy():
    """Both sets drawn with replacement from the one seeded generator (real first), scipy's FID of the drawn rows,
    then the replicates' 95 % spread placed around the point estimate."""
    real, gen = features(40, 6, 10), features(30, 6, 11, scale=1.2)
    rng = np.random.default_rng(4)
    replicates = [direct_fid(real[rng.integers(0, 40, size=(1, 40))[0]], gen[rng.integers(0, 30, size=(1, 30))[0]])
                  for _ in range(40)]
    point = direct_fid(real, gen)
    low, mid, high = np.percentile(replicates, [2.5, 50, 97.5])
    got_point, got = bootstrap.fid_ci(real, gen, n_resamples=40, seed=4)
    assert got_point == pytest.approx(point, rel=1e-6)
    assert got == pytest.approx([point + low - mid, point + high - mid], rel=1e-6)


def test_fid_difference_equals_the_bootstrap_written_out_with_one_shared_reference_resample():
    real, gen_a, gen_b = features(30, 5, 14), features(30, 5, 15), features(30, 5, 16, scale=1.3)
    rng = np.random.default_rng(6)
    replicates = []
    for _ in range(30):  # the reference drawn once for both runs, then each generated set on its own
        r, a, b = (rng.integers(0, 30, size=(1, 30))[0] for _ in range(3))
        replicates.append(direct_fid(real[r], gen_b[b]) - direct_fid(real[r], gen_a[a]))
    point = direct_fid(real, gen_b) - direct_fid(real, gen_a)
    low, mid, high = np.percentile(replicates, [2.5, 50, 97.5])
    got_point, got = bootstrap.fid_difference(real, gen_a, real.copy(), gen_b, n_resamples=30, seed=6)
    assert got_point == pytest.approx(point, rel=1e-6)
    assert got == pytest.approx([point + low - mid, point + high - mid], rel=1e-6)


def test_raw_fid_replicates_sit_above_the_estimate_and_the_centred_interval_does_not():
    rng = np.random.default_rng(12)  # few images for as many independent features: a large finite-sample bias
    real, gen = rng.normal(size=(60, 48)), rng.normal(size=(60, 48)) * 1.05
    fid = bootstrap.FidBootstrap(real, gen)
    rng = np.random.default_rng(0)
    replicates = [fid.fid(bootstrap.resample_counts(60, 1, rng)[0], bootstrap.resample_counts(60, 1, rng)[0])
                  for _ in range(200)]
    assert bootstrap.percentile_interval(replicates)[0] > fid.fid()  # the raw percentile interval misses it
    low, high = bootstrap.fid_ci(real, gen, n_resamples=200)[1]
    assert low < fid.fid() < high


def test_grouped_resampling_moves_every_patch_of_an_image_together():
    groups = np.repeat(np.arange(30), 4)  # 4 patches per image
    w = bootstrap.group_counts(groups, np.random.default_rng(0))
    assert w.sum() == 120 and all(len(set(w[groups == g])) == 1 for g in range(30))
    real, gen = features(120, 6, 6), features(120, 6, 7, shift=0.2)
    fid = bootstrap.FidBootstrap(real, gen)
    assert fid.fid(w, w) == pytest.approx(direct_fid(np.repeat(real, w, 0), np.repeat(gen, w, 0)), rel=1e-6)


def test_fid_difference_of_a_set_with_itself_is_zero_and_a_worse_set_is_significant():
    real, gen = features(150, 8, 8), features(150, 8, 9)
    diff, (low, high) = bootstrap.fid_difference(real, gen, real, gen.copy(), n_resamples=200)
    assert diff == 0 and low < 0 < high  # unpaired: each copy resampled on its own, so the interval has a width
    worse = gen * 1.5 + 0.5
    diff, (low, high) = bootstrap.fid_difference(real, gen, real, worse, n_resamples=200)
    assert diff == pytest.approx(direct_fid(real, worse) - direct_fid(real, gen), rel=1e-6)
    assert 0 < low < diff < high


# ------------------------------------------------------------------ patch crops and recorded features


def test_patch_boxes_are_deterministic_per_seed_inside_the_image_and_uniform():
    boxes = patch_boxes(300, 200, 64, 5, seed=0, index=3)
    assert boxes == patch_boxes(300, 200, 64, 5, seed=0, index=3)
    assert boxes != patch_boxes(300, 200, 64, 5, seed=1, index=3) != patch_boxes(300, 200, 64, 5, seed=0, index=4)
    many = np.array([box for i in range(400) for box in patch_boxes(300, 200, 64, 5, seed=0, index=i)])
    assert many[:, 0].min() == 0 and many[:, 0].max() == 300 - 64 and many[:, 1].max() == 200 - 64
    assert many[:, 0].mean() == pytest.approx((300 - 64) / 2, rel=0.05)  # uniform over the positions
    assert patch_boxes(64, 64, 64, 2, 0, 0) == [(0, 0), (0, 0)]
    with pytest.raises(UsageError, match="smaller than --patch_size 65"):
        patch_boxes(64, 300, 65, 1, 0, 7)


def test_image_patches_are_native_resolution_crops_at_the_boxes():
    pixels = np.random.default_rng(0).integers(0, 256, size=(120, 170, 3), dtype=np.uint8)
    crops = image_patches(Image.fromarray(pixels), 32, 3, seed=5, index=2)
    assert crops.shape == (3, 3, 32, 32) and crops.dtype == torch.uint8
    for crop, (left, top) in zip(crops, patch_boxes(170, 120, 32, 3, 5, 2)):
        assert np.array_equal(crop.permute(1, 2, 0).numpy(), pixels[top:top + 32, left:left + 32])


def test_recorded_features_are_what_the_fid_metric_summed():
    from torchmetrics.image.fid import FrechetInceptionDistance

    class Features(torch.nn.Module):  # a stand-in feature extractor: 5 pixel statistics
        num_features = 5

        def forward(self, x):
            x = x.float()
            return torch.stack([x.mean((1, 2, 3)), x.std((1, 2, 3)), x[:, 0].mean((1, 2)), x[:, 1].amax((1, 2)),
                                x[:, 2].amin((1, 2))], dim=1)

    metric = FrechetInceptionDistance(feature=Features(), sync_on_compute=False)
    generator = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (4, 3, 16, 16), generator=generator, dtype=torch.uint8) for _ in range(6)]
    with recorded_features(metric) as recorded:
        for k, batch in enumerate(images):
            metric.update(batch, real=k % 2 == 0)
    assert recorded["real"].shape == (12, 5) and recorded["generated"].shape == (12, 5)
    assert float(metric.compute()) == pytest.approx(bootstrap.FidBootstrap(recorded["real"],
                                                                           recorded["generated"]).fid(), rel=1e-5)
    metric.update(images[0], real=True)  # after the block: nothing recorded any more
    assert recorded["real"].shape == (12, 5)


# ------------------------------------------------------------------ prompts resampled jointly, KID, FID∞


def test_an_aligned_fid_interval_draws_each_prompt_with_its_real_image():
    """One index draw per replicate serves the reference and the generated set (row i of both: prompt i)."""
    real, gen = features(40, 6, 20), features(40, 6, 21, scale=1.2)
    rng = np.random.default_rng(4)
    replicates = [direct_fid(real[p], gen[p]) for p in (rng.integers(0, 40, size=(1, 40))[0] for _ in range(40))]
    point = direct_fid(real, gen)
    low, mid, high = np.percentile(replicates, [2.5, 50, 97.5])
    got_point, got = bootstrap.fid_ci(real, gen, n_resamples=40, seed=4, aligned=True)
    assert got_point == pytest.approx(point, rel=1e-6)
    assert got == pytest.approx([point + low - mid, point + high - mid], rel=1e-6)


def direct_kid(x, y, ix=None, iy=None, aligned=False):
    """KID written out over the drawn rows (ix, iy: the original row of each draw): the mean kernel over pairs of
    draws of different rows within a set, minus twice the mean over real-generated pairs (aligned: without the pairs
    of two different draws of one prompt); every row once, torchmetrics' unbiased MMD²."""
    ix = np.arange(len(x)) if ix is None else np.asarray(ix)
    iy = np.arange(len(y)) if iy is None else np.asarray(iy)
    kernel = lambda a, b: (a @ b.T / x.shape[1] + 1) ** 3  # noqa: E731
    within = lambda k, i: k[i[:, None] != i[None, :]].mean()  # noqa: E731
    kxy = kernel(x[ix], y[iy])
    keep = np.ones(kxy.shape, bool)
    if aligned:
        keep = (ix[:, None] != iy[None, :]) | (np.arange(len(ix))[:, None] == np.arange(len(iy))[None, :])
    return within(kernel(x[ix], x[ix]), ix) + within(kernel(y[iy], y[iy]), iy) - 2 * kxy[keep].mean()


def test_kid_equals_torchmetrics_kernel_inception_distance_on_one_subset_of_every_image():
    from torchmetrics.image.kid import KernelInceptionDistance

    real, gen = features(50, 12, 30), features(50, 12, 31, scale=1.1, shift=0.05)
    metric = KernelInceptionDistance(feature=torch.nn.Identity(), subsets=1, subset_size=50)
    metric.update(torch.from_numpy(real), real=True)
    metric.update(torch.from_numpy(gen), real=False)
    expected = float(metric.compute()[0])
    for aligned in (False, True):
        assert bootstrap.KidBootstrap(real, gen, aligned=aligned).kid() == pytest.approx(expected, rel=1e-6)
    # Sets of different sizes (torchmetrics needs equal subsets): the same estimator written out.
    assert bootstrap.KidBootstrap(real, gen[:35]).kid() == pytest.approx(direct_kid(real, gen[:35]), rel=1e-9)


def test_a_kid_replicate_leaves_out_pairs_of_two_draws_of_one_image():
    real, gen = features(25, 7, 32), features(25, 7, 33, scale=1.3)
    rng = np.random.default_rng(1)
    for aligned in (False, True):
        w_r = bootstrap.resample_counts(25, 1, rng)[0]
        w_g = w_r if aligned else bootstrap.resample_counts(25, 1, rng)[0]
        ix, iy = np.repeat(np.arange(25), w_r), np.repeat(np.arange(25), w_g)
        got = bootstrap.KidBootstrap(real, gen, aligned=aligned).kid(w_r, w_g)
        assert got == pytest.approx(direct_kid(real, gen, ix, iy, aligned), rel=1e-9)


def test_a_paired_difference_draws_one_set_of_prompts_for_the_reference_and_both_runs():
    """Two patches per image: a drawn prompt brings both patches of its real and of both generated images."""
    real, gen_a, gen_b = features(60, 5, 14), features(60, 5, 15), features(60, 5, 16, scale=1.3)
    groups = np.repeat(np.arange(30), 2)
    rng = np.random.default_rng(6)
    fid, kid = [], []
    for _ in range(30):
        p = rng.integers(0, 30, size=(1, 30))[0]
        rows = (2 * p[:, None] + np.arange(2)).ravel()
        fid.append(direct_fid(real[rows], gen_b[rows]) - direct_fid(real[rows], gen_a[rows]))
        kid.append(direct_kid(real, gen_b, rows, rows, True) - direct_kid(real, gen_a, rows, rows, True))
    run = lambda gen: {"real": real, "generated": gen, "real_groups": groups, "gen_groups": groups,  # noqa: E731
                       "aligned": True}
    got = bootstrap.distance_differences(run(gen_a), run(gen_b), n_resamples=30, seed=6, paired=True)
    for name, replicates, direct in (("fid", fid, direct_fid), ("kid", kid, direct_kid)):
        point = direct(real, gen_b) - direct(real, gen_a)
        assert got[name][0] == pytest.approx(point, rel=1e-6)
        assert got[name][1] == pytest.approx(np.array(replicates) - np.median(replicates) + point, rel=1e-6)
    assert bootstrap.fid_difference(real, gen_a, real, gen_b, 30, 6, groups=(groups,) * 4, paired=True,
                                    aligned=(True, True))[1] == pytest.approx(
        bootstrap.percentile_interval(got["fid"][1]), rel=1e-12)


def test_fid_inf_is_the_intercept_of_the_fids_of_subsets_fitted_in_one_over_n():
    real, gen = features(40, 5, 40), features(40, 5, 41, scale=1.2)
    fractions = (0.5, 0.75, 1.0)
    rng = np.random.default_rng([3, 1])  # the subsets' generator, seeded [seed, 1]
    x, y = [], []
    for fraction in fractions:
        n = round(fraction * 40)
        chosen = rng.multivariate_hypergeometric(np.ones(40, np.int64), n) if fraction < 1 else np.ones(40, int)
        rows = np.repeat(np.arange(40), chosen)  # aligned: the same prompts on both sides
        x.append(40 / n)
        y.append(direct_fid(real[rows], gen[rows]))
    summary = bootstrap.fid_family(real, gen, n_resamples=0, seed=3, aligned=True, fractions=fractions)
    assert summary["fid_inf"] == pytest.approx(np.polyfit(x, y, 1)[1], rel=1e-6)
    assert summary["fid_inf_sizes"] == [20, 30, 40] and summary["fid_inf_seed"] == 3
    assert summary["fid"] == pytest.approx(direct_fid(real, gen), rel=1e-6) and "fid_ci95" not in summary


def test_fid_inf_removes_the_finite_sample_bias_that_fid_carries():
    """Simulated Gaussian features whose FID∞ is known in closed form (bench/bench_coverage.py): over 30 studies
    FID sits well above FID∞, FID∞'s estimate does not, and the bootstrap's bias estimate is FID's own."""
    scenario = Scenario("correlated", d=8, n=150)
    rng, fids, infs, bias = np.random.default_rng(0), [], [], []
    for _ in range(30):
        real, gens = scenario.draw(rng)
        summary = bootstrap.fid_family(real, gens["a"], n_resamples=200 if len(bias) < 5 else 0, aligned=True)
        fids.append(summary["fid"])
        infs.append(summary["fid_inf"])
        bias += [summary["fid_bias"]] if "fid_bias" in summary else []
    true_bias = np.mean(fids) - scenario.fid_inf["a"]
    assert true_bias > 0.3 * scenario.fid_inf["a"]
    assert abs(np.mean(infs) - scenario.fid_inf["a"]) < 0.15 * true_bias
    assert np.mean(bias) == pytest.approx(true_bias, rel=0.3)


def test_the_paired_difference_holds_the_true_difference_and_is_narrower_than_the_unpaired_one():
    """100 simulated studies of two runs and a reference over shared prompts (bench/bench_coverage.py); the true
    E[FID_b − FID_a] from 1,000 fresh studies with scipy's FID."""
    scenario = Scenario("correlated", d=8, n=60)
    truth = scenario.truths(fresh=1000)["fid_diff"]
    rng, held, widths = np.random.default_rng(3), 0, {True: [], False: []}
    for _ in range(100):
        real, gens = scenario.draw(rng)
        for paired in (True, False):
            _, (low, high) = bootstrap.fid_difference(real, gens["a"], real, gens["b"], 200, paired=paired,
                                                      aligned=(paired, paired))
            widths[paired].append(high - low)
            held += paired and low <= truth <= high
    assert held >= 90
    assert np.mean(widths[True]) < 0.5 * np.mean(widths[False])


# ------------------------------------------------------------------ p-values and Holm


def test_p_value_counts_the_replicates_on_either_side_of_zero():
    assert bootstrap.p_value([-1.0, 0.0, 1.0, 2.0, 3.0]) == pytest.approx((2 * 2 + 1) / 6)  # ≤ 0: 2, ≥ 0: 4
    assert bootstrap.p_value(np.arange(1, 1000.0)) == pytest.approx(1 / 1000)  # the smallest p of 999 replicates
    assert bootstrap.p_value([0.0] * 10) == 1.0 and bootstrap.p_value([]) is None
    assert bootstrap.p_value([float("nan"), -2.0, -1.0]) == pytest.approx(1 / 3)


def test_holm_rejects_what_the_adjusted_p_values_written_out_put_at_or_below_alpha():
    """Holm's adjusted p of the j-th smallest: max over i ≤ j of (m − i + 1) p_(i)."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        p = list(rng.uniform(0, 0.03, size=8) ** rng.uniform(1, 3))
        p[3] = None  # no test: not counted in m, never rejected
        tests = sorted(v for v in p if v is not None)
        m = len(tests)
        adjusted = np.maximum.accumulate([(m - i) * v for i, v in enumerate(tests)])
        expected = [v is not None and adjusted[tests.index(v)] <= 0.05 for v in p]
        assert bootstrap.holm(p) == expected
    assert bootstrap.holm([0.01, 0.04, 0.03]) == [True, False, False]  # 0.01 ≤ 0.05/3; 0.03 > 0.05/2 stops
    assert bootstrap.holm([0.04, 0.01, 0.02]) == [True, True, True]  # 0.01 ≤ 0.05/3, 0.02 ≤ 0.05/2, 0.04 ≤ 0.05


def test_holm_can_reject_only_with_enough_resamples():
    for m in (1, 6, 18, 50):
        b = bootstrap.holm_min_resamples(m)
        assert 1 / (b + 1) <= 0.05 / m < 1 / b  # the smallest p at B reaches the first bound, at B − 1 it does not
    assert bootstrap.holm_min_resamples(18) == 359
