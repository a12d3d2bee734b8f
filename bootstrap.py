"""Bootstrap intervals over images: means, ratios of sums, FID from Inception features, and paired differences.

Every interval is the 95 % percentile interval of N resamples drawn with replacement (numpy's PCG64, seeded).
A resample is a vector of counts (how often each image is drawn), so a mean is `counts @ values / n` and one
matrix product gives every resample at once. FID resamples both feature sets and never forms a 2048 × 2048 matrix
square root: with A = diag(√w)(X − μ_w) for each set, tr √(Σ_r Σ_g) is the sum of the singular values of
A_r A_gᵀ, an n_r × n_g matrix built from the cross Gram matrix X_r X_gᵀ, computed once (PROTOCOL.md §6).
"""
import numpy as np

DEFAULT_RESAMPLES = 1000
DEFAULT_SEED = 0
GRAM_LIMIT = 6000  # above this many images per set, FID goes through d × d covariances instead of Gram matrices


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


def percentile_interval(replicates):
    """[2.5 %, 97.5 %] percentiles of the bootstrap replicates, as two floats (NaN replicates are left out)."""
    replicates = np.asarray(replicates, dtype=np.float64)
    replicates = replicates[~np.isnan(replicates)]
    if not len(replicates):
        return [float("nan"), float("nan")]
    low, high = np.percentile(replicates, [2.5, 97.5])
    return [float(low), float(high)]


def centred_interval(point, replicates):
    """The bootstrap's 95 % spread placed around the point estimate: point + [q2.5 − q50, q97.5 − q50].

    For FID: a resample draws ≈ 63 % distinct images, and FID's finite-sample bias grows as the set shrinks, so the
    replicates sit well above the point estimate (PROTOCOL.md §6); their spread is kept, their offset is not.
    """
    replicates = np.asarray(replicates, dtype=np.float64)
    replicates = replicates[~np.isnan(replicates)]
    if not len(replicates):
        return [float("nan"), float("nan")]
    low, mid, high = np.percentile(replicates, [2.5, 50, 97.5])
    return [float(point + low - mid), float(point + high - mid)]


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


def paired_difference(a, b, n_resamples=DEFAULT_RESAMPLES, seed=DEFAULT_SEED, denominators=None):
    """(b − a, its 95 % interval): pairs resampled together. `a`, `b`: per-image values of the same images; with
    `denominators` = (den_a, den_b) the statistic is Σ b / Σ den_b − Σ a / Σ den_a (a ratio of sums), else a mean."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    keep = ~(np.isnan(a) | np.isnan(b))
    a, b = a[keep], b[keep]
    if denominators is None:
        point = float(np.mean(b) - np.mean(a))
        stat = (lambda c: c @ (b - a) / len(a))
    else:
        den_a, den_b = (np.asarray(d, dtype=np.float64)[keep] for d in denominators)
        point = float(b.sum() / den_b.sum() - a.sum() / den_a.sum())
        stat = (lambda c: (c @ b) / (c @ den_b) - (c @ a) / (c @ den_a))
    if len(a) < 2:
        return point, [float("nan"), float("nan")]
    counts = resample_counts(len(a), n_resamples, np.random.default_rng(seed))
    return point, percentile_interval(stat(counts))


#################################################################################
#                                  FID                                          #
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
        """(weighted mean, trace of the unbiased covariance) for integer counts w summing to n."""
        mu = w @ self.x / self.n
        return mu, (w @ self.sq_norms - self.n * mu @ mu) / (self.n - 1)

    def covariance(self, w):
        """The unbiased covariance of the resampled rows (d × d)."""
        mu = w @ self.x / self.n
        centred = self.x - mu
        return (centred * w[:, None]).T @ centred / (self.n - 1)


class FidBootstrap:
    """FID between a real and a generated feature set, for any resample of either (counts vectors)."""

    def __init__(self, real, generated):
        self.real, self.gen = FeatureSet(real), FeatureSet(generated)
        if self.real.x.shape[1] != self.gen.x.shape[1]:
            raise ValueError(f"feature sizes differ: {self.real.x.shape[1]} and {self.gen.x.shape[1]}")
        self.use_gram = max(self.real.n, self.gen.n) <= GRAM_LIMIT
        self.cross = self.real.x @ self.gen.x.T if self.use_gram else None  # K = X_r X_gᵀ, once

    def trace_sqrt(self, w_r, w_g):
        """tr √(Σ_r Σ_g) = Σ singular values of A_r A_gᵀ / √((n_r − 1)(n_g − 1)), only drawn rows kept."""
        r, g = np.flatnonzero(w_r), np.flatnonzero(w_g)
        k = self.cross[np.ix_(r, g)]
        kw_g, kw_r = k @ w_g[g] / self.gen.n, w_r[r] @ k / self.real.n  # X_r μ_g and X_g μ_r, on the drawn rows
        mm = w_r[r] @ kw_g / self.real.n  # μ_r · μ_g
        centred = k - kw_g[:, None] - kw_r[None, :] + mm
        c = np.sqrt(w_r[r])[:, None] * centred * np.sqrt(w_g[g])[None, :]
        small = c @ c.T if len(r) <= len(g) else c.T @ c
        singular_sum = np.sqrt(np.clip(np.linalg.eigvalsh(small), 0, None)).sum()
        return singular_sum / np.sqrt((self.real.n - 1) * (self.gen.n - 1))

    def fid(self, w_r=None, w_g=None):
        """FID of the resample given by counts (None: every image once)."""
        w_r = np.ones(self.real.n) if w_r is None else np.asarray(w_r, dtype=np.float64)
        w_g = np.ones(self.gen.n) if w_g is None else np.asarray(w_g, dtype=np.float64)
        if not self.use_gram:
            mu_r, mu_g = w_r @ self.real.x / self.real.n, w_g @ self.gen.x / self.gen.n
            return frechet_distance(mu_r, self.real.covariance(w_r), mu_g, self.gen.covariance(w_g))
        mu_r, tr_r = self.real.moments(w_r)
        mu_g, tr_g = self.gen.moments(w_g)
        return float(((mu_r - mu_g) ** 2).sum() + tr_r + tr_g - 2 * self.trace_sqrt(w_r, w_g))


def _groups(groups, n):
    """The image index of each of n rows: `groups`, or each row its own image."""
    return np.arange(n) if groups is None else np.asarray(groups)


def fid_ci(real, generated, n_resamples=DEFAULT_RESAMPLES, seed=DEFAULT_SEED, progress=None, real_groups=None,
           gen_groups=None):
    """(FID, 95 % centred interval): the real and the generated images resampled independently (with *_groups,
    every row of a resampled image, e.g. all its patches, goes with it)."""
    fid = FidBootstrap(real, generated)
    real_groups, gen_groups = _groups(real_groups, fid.real.n), _groups(gen_groups, fid.gen.n)
    rng = np.random.default_rng(seed)
    replicates = []
    for _ in (progress or iter)(range(n_resamples)):
        w_r = group_counts(real_groups, rng)
        w_g = group_counts(gen_groups, rng)
        replicates.append(fid.fid(w_r, w_g))
    point = fid.fid()
    return point, centred_interval(point, replicates)


def fid_difference(real_a, gen_a, real_b, gen_b, n_resamples=DEFAULT_RESAMPLES, seed=DEFAULT_SEED, progress=None,
                   groups=(None, None, None, None)):
    """(FID_b − FID_a, 95 % centred interval), unpaired: each generated set resampled on its own; a reference set
    shared by both (equal features) is resampled once per replicate for both, separate references independently.
    `groups`: the image index of each row of real_a, gen_a, real_b, gen_b (None: one row per image)."""
    fa, fb = FidBootstrap(real_a, gen_a), FidBootstrap(real_b, gen_b)
    g_ra, g_a, g_rb, g_b = (_groups(g, s.n) for g, s in zip(groups, (fa.real, fa.gen, fb.real, fb.gen)))
    shared = fa.real.x.shape == fb.real.x.shape and np.array_equal(fa.real.x, fb.real.x)
    rng = np.random.default_rng(seed)
    replicates = []
    for _ in (progress or iter)(range(n_resamples)):
        w_ra = group_counts(g_ra, rng)
        w_rb = w_ra if shared else group_counts(g_rb, rng)
        w_a, w_b = group_counts(g_a, rng), group_counts(g_b, rng)
        replicates.append(fb.fid(w_rb, w_b) - fa.fid(w_ra, w_a))
    point = fb.fid() - fa.fid()
    return point, centred_interval(point, replicates)


#################################################################################
#                              Summary JSON keys                                #
#################################################################################

def json_interval(interval):
    """An interval with NaN (no data) written as null, as the summaries write NaN."""
    return [None if v is None or np.isnan(v) else float(v) for v in interval]


def add_bootstrap_flags(parser):
    """--bootstrap N and --bootstrap_seed, shared by every evaluation script."""
    parser.add_argument("--bootstrap", type=int, default=DEFAULT_RESAMPLES,
                        help="resamples of the images for each metric's 95%% interval (<metric>_ci95); 0: none")
    parser.add_argument("--bootstrap_seed", type=int, default=DEFAULT_SEED, help="seed of the resampling")


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
