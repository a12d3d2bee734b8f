"""Bootstrap intervals over images: means, ratios of sums, paired differences, FID, KID and FID∞ from Inception
features, and the p-values of many comparisons with Holm's correction.

Every interval is a 95 % interval of N resamples drawn with replacement (numpy's PCG64, seeded). A resample is a
vector of counts (how often each image is drawn), so a mean is `counts @ values / n` and one matrix product gives
every resample at once. Feature sets of the same prompts (a prompt's real image, its generated image in each run)
share one vector of counts per resample: the prompts are resampled, not each set on its own. FID never forms a
2048 × 2048 matrix square root: with A = diag(√w)(X − μ_w) for each set, tr √(Σ_r Σ_g) is the sum of the singular
values of A_r A_gᵀ, built from the cross Gram matrix X_r X_gᵀ computed once (PROTOCOL.md §6).
"""
import math

import numpy as np

from errors import UsageError

DEFAULT_RESAMPLES = 1000
MIN_RESAMPLES = 200  # below this a 95 % interval's ends are each read from fewer than 5 replicates
DEFAULT_SEED = 0
GRAM_LIMIT = 6000  # above this many images per set (or 4 × d), FID goes through d × d covariances, not Gram matrices
FID_INF_FRACTIONS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # FID∞: subsets of these shares of the images (PROTOCOL.md §6)
ALPHA = 0.05


#################################################################################
#                                 Resampling                                    #
#################################################################################

def resample_counts(n, n_resamples, rng):
    """(n_resamples, n) int counts: how often each of n items is drawn in each resample with replacement."""
    draws = rng.integers(0, n, size=(n_resamples, n))
    offsets = (np.arange(n_resamples) * n)[:, None]
    return np.bincount((draws + offsets).ravel(), minlength=n_resamples * n).reshape(n_resamples, n)


def group_counts(groups, rng):
    """Counts per row when whole groups are resampled (groups: the image index 0..G-1 of each row, e.g. of each
    patch); None: every row on its own."""
    groups = np.asarray(groups)
    return resample_counts(int(groups.max()) + 1, 1, rng)[0][groups]


class Resampler:
    """The counts of several feature sets in one replicate. Each set has its rows' image index 0..G-1 (`groups`: an
    image's patches go together) and a space, the images it is drawn over: sets of one space share a single draw (a
    prompt's real image and its generated image in each run), other spaces are drawn on their own, in the order they
    first appear."""

    def __init__(self, groups, spaces):
        self.groups, self.spaces, self.sizes = [np.asarray(g) for g in groups], list(spaces), {}
        for g, space in zip(self.groups, self.spaces):
            if self.sizes.setdefault(space, int(g.max()) + 1) != int(g.max()) + 1:
                raise ValueError(f"the sets drawn together as {space!r} need the same number of images")

    def everything(self):
        """{space: counts} of the data itself: every image once."""
        return {space: np.ones(n, dtype=np.int64) for space, n in self.sizes.items()}

    def draw(self, rng):
        """{space: counts} of one resample with replacement of each space's images."""
        return {space: resample_counts(n, 1, rng)[0] for space, n in self.sizes.items()}

    def subset_size(self, space, fraction):
        """round(fraction · G) images of a space, at least 2."""
        return max(2, round(fraction * self.sizes[space]))

    def subset(self, units, fraction, rng):
        """{space: counts} of subset_size of the images in `units` (counts), drawn without replacement."""
        return {space: rng.multivariate_hypergeometric(counts, self.subset_size(space, fraction))
                for space, counts in units.items()}

    def rows(self, units):
        """The counts of every row of every set, float64."""
        return [units[space][g].astype(np.float64) for g, space in zip(self.groups, self.spaces)]


def _groups(groups, n):
    """The image index of each of n rows: `groups`, or each row its own image."""
    return np.arange(n) if groups is None else np.asarray(groups)


#################################################################################
#                          Intervals, p-values, Holm                            #
#################################################################################

def percentile_interval(replicates):
    """[2.5 %, 97.5 %] percentiles of the bootstrap replicates, as two floats (NaN replicates are left out)."""
    replicates = np.asarray(replicates, dtype=np.float64)
    replicates = replicates[~np.isnan(replicates)]
    if not len(replicates):
        return [float("nan"), float("nan")]
    low, high = np.percentile(replicates, [2.5, 97.5])
    return [float(low), float(high)]


def centred_replicates(point, replicates):
    """The replicates (NaN left out) moved so that their median is the point estimate: their spread, not their
    offset. For FID: a resample draws ≈ 63 % distinct images, and FID's finite-sample bias grows as the set shrinks,
    so the replicates sit above the point estimate (PROTOCOL.md §6)."""
    replicates = np.asarray(replicates, dtype=np.float64)
    replicates = replicates[~np.isnan(replicates)]
    return replicates - np.median(replicates) + point if len(replicates) else replicates


def centred_interval(point, replicates):
    """The bootstrap's 95 % spread placed around the point estimate: point + [q2.5 − q50, q97.5 − q50]."""
    return percentile_interval(centred_replicates(point, replicates))


def p_value(replicates):
    """Two-sided bootstrap p-value of "the difference is 0", from the replicates its interval is read from:
    (2 · min(#{δ* ≤ 0}, #{δ* ≥ 0}) + 1) / (B + 1), at most 1; None without replicates. Never below 1 / (B + 1)."""
    replicates = np.asarray(replicates, dtype=np.float64)
    replicates = replicates[~np.isnan(replicates)]
    if not len(replicates):
        return None
    tail = min(int((replicates <= 0).sum()), int((replicates >= 0).sum()))
    return min(1.0, (2 * tail + 1) / (len(replicates) + 1))


def holm(p_values, alpha=ALPHA):
    """Holm–Bonferroni over the m p-values given (None: no test): [rejected] at family-wise error rate alpha. The
    smallest p is compared with alpha / m, the next with alpha / (m − 1), ..., stopping at the first that is not
    below its bound."""
    tests = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    rejected = [False] * len(p_values)
    for rank, (p, i) in enumerate(tests):
        if p > alpha / (len(tests) - rank):
            break
        rejected[i] = True
    return rejected


def holm_min_resamples(m, alpha=ALPHA):
    """The fewest resamples B at which Holm can reject any of m tests: p ≥ 1 / (B + 1) must reach alpha / m."""
    return max(math.ceil(m / alpha - 1e-9) - 1, 0)


#################################################################################
#                        Means, ratios, paired differences                      #
#################################################################################

def mean_ci(values, n_resamples=DEFAULT_RESAMPLES, seed=DEFAULT_SEED):
    """95 % bootstrap interval of the mean of `values` (NaNs left out first)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if len(values) < 2:
        return [float("nan"), float("nan")]
    counts = resample_counts(len(values), n_resamples, np.random.default_rng(seed))
    return percentile_interval(counts @ values / len(values))


def ratio_ci(numerators, denominators, n_resamples=DEFAULT_RESAMPLES, seed=DEFAULT_SEED):
    """95 % bootstrap interval of Σ numerators / Σ denominators (the Compression Ratio's form), images resampled."""
    numerators, denominators = (np.asarray(v, dtype=np.float64) for v in (numerators, denominators))
    if len(numerators) < 2:
        return [float("nan"), float("nan")]
    counts = resample_counts(len(numerators), n_resamples, np.random.default_rng(seed))
    return percentile_interval((counts @ numerators) / (counts @ denominators))


def paired_replicates(a, b, n_resamples=DEFAULT_RESAMPLES, seed=DEFAULT_SEED, denominators=None):
    """(b − a, its bootstrap replicates, the number of pairs used): pairs with a NaN on either side left out, the
    others resampled together. `a`, `b`: per-image values of the same images; with `denominators` = (den_a, den_b)
    the statistic is Σ b / Σ den_b − Σ a / Σ den_a (a ratio of sums), else a mean."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    keep = ~(np.isnan(a) | np.isnan(b))
    a, b = a[keep], b[keep]
    if denominators is None:
        point = float(np.mean(b) - np.mean(a)) if len(a) else float("nan")
        stat = (lambda c: c @ (b - a) / len(a))
    else:
        den_a, den_b = (np.asarray(d, dtype=np.float64)[keep] for d in denominators)
        point = float(b.sum() / den_b.sum() - a.sum() / den_a.sum()) if len(a) else float("nan")
        stat = (lambda c: (c @ b) / (c @ den_b) - (c @ a) / (c @ den_a))
    if len(a) < 2:
        return point, np.zeros(0), len(a)
    counts = resample_counts(len(a), n_resamples, np.random.default_rng(seed))
    return point, stat(counts), len(a)


def paired_difference(a, b, n_resamples=DEFAULT_RESAMPLES, seed=DEFAULT_SEED, denominators=None):
    """(b − a, its 95 % interval): paired_replicates' point and percentile interval."""
    point, replicates, _ = paired_replicates(a, b, n_resamples, seed, denominators)
    return point, percentile_interval(replicates)


#################################################################################
#                                  FID and KID                                  #
#################################################################################

def frechet_distance(mu1, sigma1, mu2, sigma2):
    """‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2 tr √(Σ1 Σ2), float64; tr √(Σ1 Σ2) from the eigenvalues of R Σ2 R, R = √Σ1."""
    mu1, mu2, sigma1, sigma2 = (np.asarray(x, dtype=np.float64) for x in (mu1, mu2, sigma1, sigma2))
    values, vectors = np.linalg.eigh(sigma1)
    root = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(root @ sigma2 @ root), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


class FeatureSet:
    """One side of an FID: n × d features in float64, with the per-row squared norms a resample needs."""

    def __init__(self, features):
        self.x = np.asarray(features, dtype=np.float64)
        if self.x.ndim != 2 or len(self.x) < 2:
            raise ValueError(f"FID needs at least 2 feature rows, got shape {self.x.shape}")
        self.n = len(self.x)
        self.sq_norms = np.einsum("ij,ij->i", self.x, self.x)

    def moments(self, w):
        """(weighted mean, trace of the unbiased covariance) of the rows drawn w times (w sums to m ≥ 2)."""
        m = w.sum()
        mu = w @ self.x / m
        return mu, (w @ self.sq_norms - m * mu @ mu) / (m - 1)

    def covariance(self, w):
        """The unbiased covariance of the rows drawn w times (d × d)."""
        m = w.sum()
        centred = self.x - w @ self.x / m
        return (centred * w[:, None]).T @ centred / (m - 1)


class FidBootstrap:
    """FID between a real and a generated feature set, for any counts of their rows (a resample, a subset)."""

    def __init__(self, real, generated):
        self.real, self.gen = FeatureSet(real), FeatureSet(generated)
        if self.real.x.shape[1] != self.gen.x.shape[1]:
            raise ValueError(f"feature sizes differ: {self.real.x.shape[1]} and {self.gen.x.shape[1]}")
        # A resample's Gram route costs about (0.63 n)³, the covariance route d³ + n d²: the smaller one.
        self.use_gram = max(self.real.n, self.gen.n) <= min(GRAM_LIMIT, 4 * self.real.x.shape[1])
        self.cross = self.real.x @ self.gen.x.T if self.use_gram else None  # K = X_r X_gᵀ, once

    def trace_sqrt(self, w_r, w_g):
        """tr √(Σ_r Σ_g) = Σ singular values of A_r A_gᵀ / √((m_r − 1)(m_g − 1)), only drawn rows kept."""
        r, g = np.flatnonzero(w_r), np.flatnonzero(w_g)
        m_r, m_g = w_r.sum(), w_g.sum()
        k = self.cross[np.ix_(r, g)]
        kw_g, kw_r = k @ w_g[g] / m_g, w_r[r] @ k / m_r  # X_r μ_g and X_g μ_r, on the drawn rows
        mm = w_r[r] @ kw_g / m_r  # μ_r · μ_g
        centred = k - kw_g[:, None] - kw_r[None, :] + mm
        c = np.sqrt(w_r[r])[:, None] * centred * np.sqrt(w_g[g])[None, :]
        small = c @ c.T if len(r) <= len(g) else c.T @ c
        singular_sum = np.sqrt(np.clip(np.linalg.eigvalsh(small), 0, None)).sum()
        return singular_sum / np.sqrt((m_r - 1) * (m_g - 1))

    def fid(self, w_r=None, w_g=None):
        """FID of the rows drawn w_r and w_g times (None: every row once)."""
        w_r = np.ones(self.real.n) if w_r is None else np.asarray(w_r, dtype=np.float64)
        w_g = np.ones(self.gen.n) if w_g is None else np.asarray(w_g, dtype=np.float64)
        if not self.use_gram:
            mu_r, mu_g = w_r @ self.real.x / w_r.sum(), w_g @ self.gen.x / w_g.sum()
            return frechet_distance(mu_r, self.real.covariance(w_r), mu_g, self.gen.covariance(w_g))
        mu_r, tr_r = self.real.moments(w_r)
        mu_g, tr_g = self.gen.moments(w_g)
        return float(((mu_r - mu_g) ** 2).sum() + tr_r + tr_g - 2 * self.trace_sqrt(w_r, w_g))


def polynomial_kernel(gram, d):
    """KID's kernel k(x, y) = (x·y / d + 1)³ from the Gram matrix of x·y (torchmetrics: degree 3, gamma 1/d, coef 1)."""
    return (gram / d + 1.0) ** 3


class KidBootstrap:
    """KID between a real and a generated feature set, for any counts of their rows: torchmetrics'
    KernelInceptionDistance on one subset holding every row, the MMD² estimate
    Σ_{i≠j} k(x_i, x_j) / (m_x(m_x − 1)) + Σ_{i≠j} k(y_i, y_j) / (m_y(m_y − 1)) − 2 Σ_{i,j} k(x_i, y_j) / (m_x m_y),
    unbiased when the two sets are independent samples. In a resample, two draws of one row are not a pair (as two
    images of a fresh sample never coincide) and, with `aligned` sets (row i of both: prompt i), a draw's own
    real-generated pair counts once: every row once gives torchmetrics' value, and a resample's mean stays at it.
    Memory: three kernel matrices, n_r², n_g² and n_r · n_g float64."""

    def __init__(self, real, generated, cross=None, aligned=False):
        real, generated = np.asarray(real, dtype=np.float64), np.asarray(generated, dtype=np.float64)
        d = real.shape[1]
        self.k_rr, self.k_gg = polynomial_kernel(real @ real.T, d), polynomial_kernel(generated @ generated.T, d)
        self.k_rg = polynomial_kernel(real @ generated.T if cross is None else cross, d)
        self.aligned = aligned and len(real) == len(generated)

    @staticmethod
    def within(k, w):
        """The mean of k over pairs of draws of two different rows (every row once: Σ_{i≠j} k_ij / (m(m − 1)))."""
        return (w @ k @ w - (w * w) @ np.diagonal(k)) / (w.sum() ** 2 - w @ w)

    def cross(self, w_r, w_g):
        """The mean of k over real-generated pairs of draws (aligned: less the pairs of two draws of one prompt)."""
        total, pairs = w_r @ self.k_rg @ w_g, w_r.sum() * w_g.sum()
        if self.aligned:
            ties = w_r * w_g - np.minimum(w_r, w_g)
            total, pairs = total - ties @ np.diagonal(self.k_rg), pairs - ties.sum()
        return total / pairs

    def kid(self, w_r=None, w_g=None):
        """KID of the rows drawn w_r and w_g times (None: every row once)."""
        w_r = np.ones(len(self.k_rr)) if w_r is None else np.asarray(w_r, dtype=np.float64)
        w_g = np.ones(len(self.k_gg)) if w_g is None else np.asarray(w_g, dtype=np.float64)
        return float(self.within(self.k_rr, w_r) + self.within(self.k_gg, w_g) - 2 * self.cross(w_r, w_g))


def fid_inf(fid, resampler, units, fractions, rng, full):
    """Chong & Forsyth's FID∞ (CVPR 2020) of the images in `units`: for each fraction f, the FID of N = round(f · G)
    of each space's images drawn without replacement (f = 1: all of them, whose FID is `full`), fitted linearly in
    G / N (G, N: the first space's) and read at G / N = 0."""
    if len(set(fractions)) < 2 or not all(0 < f <= 1 for f in fractions):
        raise ValueError(f"FID∞ needs at least two distinct fractions in (0, 1], got {fractions}")
    space, x, y = next(iter(resampler.sizes)), [], []
    for fraction in fractions:
        x.append(resampler.sizes[space] / resampler.subset_size(space, fraction))
        y.append(full if fraction >= 1 else fid.fid(*resampler.rows(resampler.subset(units, fraction, rng))))
    return float(np.polyfit(x, y, 1)[1])


#################################################################################
#                         FID-family intervals and differences                  #
#################################################################################

def fid_ci(real, generated, n_resamples=DEFAULT_RESAMPLES, seed=DEFAULT_SEED, progress=None, real_groups=None,
           gen_groups=None, aligned=False):
    """(FID, 95 % centred interval). aligned: the reference's images are the generated images' prompts (one each,
    in the same order), resampled jointly; otherwise each set on its own (real first). With *_groups, every row of
    a resampled image (e.g. all its patches) goes with it."""
    fid = FidBootstrap(real, generated)
    resampler = Resampler((_groups(real_groups, fid.real.n), _groups(gen_groups, fid.gen.n)),
                          ("prompts", "prompts") if aligned else ("real", "generated"))
    rng = np.random.default_rng(seed)
    replicates = [fid.fid(*resampler.rows(resampler.draw(rng))) for _ in (progress or iter)(range(n_resamples))]
    point = fid.fid()
    return point, centred_interval(point, replicates)


def fid_family(real, generated, n_resamples=DEFAULT_RESAMPLES, seed=DEFAULT_SEED, real_groups=None, gen_groups=None,
               aligned=False, fractions=FID_INF_FRACTIONS, prefix="", progress=None):
    """FID, its interval and bias, FID∞ and its interval, KID and its interval, from one set of resamples (fid_ci's):
    {PREFIX + "fid", "fid_ci95", "fid_bias", "fid_inf", "fid_inf_ci95", "fid_inf_sizes", "fid_inf_seed", "kid",
    "kid_ci95"}; with no resamples only the values and FID∞'s settings; fractions None: no FID∞ (each of its
    resamples costs about 2.6 FIDs more). fid_bias: mean of the replicates − FID, the bootstrap's estimate of FID's
    finite-sample bias. The FID∞ subsets come from numpy's generator seeded with [seed, 1]; a replicate's FID∞ takes
    its subsets from the resampled images."""
    fid = FidBootstrap(real, generated)
    kid = KidBootstrap(fid.real.x, fid.gen.x, fid.cross, aligned)
    resampler = Resampler((_groups(real_groups, fid.real.n), _groups(gen_groups, fid.gen.n)),
                          ("prompts", "prompts") if aligned else ("real", "generated"))
    subsets = np.random.default_rng([seed, 1])
    infinity = (lambda units, full: fid_inf(fid, resampler, units, fractions, subsets, full)) if fractions else None
    point = {"fid": fid.fid(), "kid": kid.kid()}
    if infinity:
        point["fid_inf"] = infinity(resampler.everything(), point["fid"])
    replicates = {name: [] for name in point}
    rng = np.random.default_rng(seed)
    for _ in (progress or iter)(range(n_resamples)):
        units = resampler.draw(rng)
        rows = resampler.rows(units)
        replicates["fid"].append(fid.fid(*rows))
        replicates["kid"].append(kid.kid(*rows))
        if infinity:
            replicates["fid_inf"].append(infinity(units, replicates["fid"][-1]))
    space = "prompts" if aligned else "generated"
    out = dict(point)
    if infinity:
        out.update(fid_inf_sizes=[resampler.subset_size(space, f) for f in fractions], fid_inf_seed=seed)
    if n_resamples:
        out.update({f"{name}_ci95": json_interval(centred_interval(point[name], replicates[name])) for name in point})
        out["fid_bias"] = float(np.mean(replicates["fid"]) - point["fid"])
    return {prefix + key: value for key, value in out.items()}


def difference_spaces(paired, aligned, shared):
    """The resampling spaces of (real_a, gen_a, real_b, gen_b). paired: gen_a and gen_b hold the same prompts in the
    same order; aligned[k]: run k's reference holds those prompts' real images; shared: one reference for both."""
    gen = ("prompts", "prompts") if paired else ("a", "b")
    refs = ["prompts" if paired and aligned[k] else "reference" if shared else gen[k] if aligned[k]
            else f"reference_{'ab'[k]}" for k in (0, 1)]
    return refs[0], gen[0], refs[1], gen[1]


def distance_differences(run_a, run_b, n_resamples=DEFAULT_RESAMPLES, seed=DEFAULT_SEED, paired=False, kid=True,
                         progress=None):
    """{"fid": (FID_b − FID_a, centred replicates)[, "kid": (KID_b − KID_a, centred replicates)]} from one set of
    resamples. run_*: {"real", "generated", optional "real_groups", "gen_groups", "aligned"}. Paired: one draw of
    the prompts per replicate serves both runs (and each aligned reference); unpaired: each generated set on its
    own, a reference shared by both runs (equal features) drawn once for both, separate ones independently."""
    runs = [(FidBootstrap(r["real"], r["generated"]), r) for r in (run_a, run_b)]
    shared = runs[0][0].real.x.shape == runs[1][0].real.x.shape and np.array_equal(runs[0][0].real.x,
                                                                                   runs[1][0].real.x)
    groups = [_groups(r.get(key), getattr(f, side).n) for f, r in runs
              for key, side in (("real_groups", "real"), ("gen_groups", "gen"))]
    resampler = Resampler(groups, difference_spaces(paired, [r.get("aligned", False) for _, r in runs], shared))
    statistics = {"fid": [f.fid for f, _ in runs]}
    if kid:
        statistics["kid"] = [KidBootstrap(f.real.x, f.gen.x, f.cross, r.get("aligned", False)).kid for f, r in runs]
    points = {name: b() - a() for name, (a, b) in statistics.items()}
    replicates = {name: [] for name in statistics}
    rng = np.random.default_rng(seed)
    for _ in (progress or iter)(range(n_resamples)):
        w_ra, w_a, w_rb, w_b = resampler.rows(resampler.draw(rng))
        for name, (a, b) in statistics.items():
            replicates[name].append(b(w_rb, w_b) - a(w_ra, w_a))
    return {name: (points[name], centred_replicates(points[name], replicates[name])) for name in statistics}


def fid_difference(real_a, gen_a, real_b, gen_b, n_resamples=DEFAULT_RESAMPLES, seed=DEFAULT_SEED, progress=None,
                   groups=(None, None, None, None), paired=False, aligned=(False, False)):
    """(FID_b − FID_a, 95 % centred interval), resampled as distance_differences says. `groups`: the image index of
    each row of real_a, gen_a, real_b, gen_b (None: one row per image)."""
    run_a = {"real": real_a, "generated": gen_a, "real_groups": groups[0], "gen_groups": groups[1],
             "aligned": aligned[0]}
    run_b = {"real": real_b, "generated": gen_b, "real_groups": groups[2], "gen_groups": groups[3],
             "aligned": aligned[1]}
    point, replicates = distance_differences(run_a, run_b, n_resamples, seed, paired, kid=False,
                                             progress=progress)["fid"]
    return point, percentile_interval(replicates)


#################################################################################
#                        Summary JSON keys and the flags                        #
#################################################################################

def json_interval(interval):
    """An interval with NaN (no data) written as null, as the summaries write NaN."""
    return [None if v is None or np.isnan(v) else float(v) for v in interval]


def add_bootstrap_flags(parser):
    """--bootstrap N and --bootstrap_seed, shared by every evaluation script."""
    parser.add_argument("--bootstrap", type=int, default=DEFAULT_RESAMPLES,
                        help=f"resamples of the images for each metric's 95%% interval (<metric>_ci95): 0 (none) or "
                             f"at least {MIN_RESAMPLES}")
    parser.add_argument("--bootstrap_seed", type=int, default=DEFAULT_SEED, help="seed of the resampling")


def check_bootstrap(n_resamples):
    """UsageError unless --bootstrap is 0 (no intervals) or at least MIN_RESAMPLES."""
    if n_resamples != 0 and n_resamples < MIN_RESAMPLES:
        raise UsageError(f"--bootstrap {n_resamples}: give 0 (no intervals) or at least {MIN_RESAMPLES} resamples "
                         f"({DEFAULT_RESAMPLES} is the default); with fewer, each end of a 95 % interval rests on a "
                         f"handful of replicates.")


def add_intervals(summary, n_resamples, seed, means=None, ratios=None):
    """Write `<metric>_ci95` into summary for {metric: per-image values} (mean) and {metric: (numerators,
    denominators)} (ratio of sums), and the resampling settings; with n_resamples 0 only `bootstrap: 0`."""
    if n_resamples < 0:
        raise ValueError("--bootstrap must be 0 (off) or a number of resamples")
    summary["bootstrap"] = n_resamples
    if not n_resamples:
        return summary
    summary["bootstrap_seed"] = seed
    for name, values in (means or {}).items():
        summary[f"{name}_ci95"] = json_interval(mean_ci(values, n_resamples, seed))
    for name, (numerators, denominators) in (ratios or {}).items():
        summary[f"{name}_ci95"] = json_interval(ratio_ci(numerators, denominators, n_resamples, seed))
    return summary
