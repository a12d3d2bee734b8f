"""Coverage of the FID-family intervals on simulated features whose every target is known: how often each 95 %
interval holds what it estimates, over many simulated studies (BENCHMARKS.md, "Coverage of the intervals").

    python -m bench.bench_coverage [--studies 200] [--bootstrap 200] [--fresh 4000] [--scenarios correlated ...]

A study draws n prompts; each prompt has a latent z ~ N(0, I_d), its real image's features z A + noise and, for
runs a and b, generated features z B_k + m_k + noise: the three sets share the prompts' variation, as real Inception
features of an eval set and two runs made from it do. Each set is Gaussian, so FID∞ is the Fréchet distance of the
known means and covariances (scipy's sqrtm). E[FID_n] (the mean n-image FID), E[FID_b − FID_a] and KID's expectation
(KID is unbiased) come from --fresh independent studies computed with numpy and scipy, not with bootstrap.py.
"""
import argparse
import json
import time

import numpy as np
import scipy.linalg

import bootstrap
from errors import HelpFormatter, exit_on_usage_error

SCENARIOS = {  # name: (d, n, what it shows)
    "correlated": (16, 100, "prompt-correlated features, more images than features"),
    "wide": (128, 100, "fewer images than features (as 195 Inception features of 2048)"),
    "equal_inf": (16, 100, "runs with equal FID∞ but different finite-sample bias"),
}


#################################################################################
#                                The simulation                                 #
#################################################################################

def reference_fid(x, y):
    """FID of two feature sets with numpy's moments and scipy's matrix square root."""
    return gaussian_fid(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))


def gaussian_fid(mu1, s1, mu2, s2):
    """The Fréchet distance of two Gaussians, scipy's sqrtm."""
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2)
                 - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real))


def reference_kid(x, y):
    """KID written out: the unbiased MMD² with k(u, v) = (u·v / d + 1)³ (torchmetrics' defaults), all rows."""
    d, m, n = x.shape[1], len(x), len(y)
    kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


class Scenario:
    """A reference and two generators over shared prompt latents, with their population moments."""

    def __init__(self, name, seed=0, d=None, n=None):
        self.name, (self.d, self.n, self.about) = name, SCENARIOS[name]
        self.d, self.n = d or self.d, n or self.n
        d, rng = self.d, np.random.default_rng(seed)
        decay = 0.9 ** np.arange(d) if d <= 32 else 0.98 ** np.arange(d)
        self.a_mix = rng.normal(size=(d, d)) * decay
        self.mix = {"a": self.a_mix + 0.15 * rng.normal(size=(d, d)) * decay,
                    "b": 1.1 * self.a_mix + 0.15 * rng.normal(size=(d, d)) * decay}
        self.noise = {"real": 0.5, "a": 0.5, "b": 0.9 if name == "equal_inf" else 0.5}
        self.shift = {"a": 0.1 * rng.normal(size=d), "b": 0.12 * rng.normal(size=d)}
        cov = {"real": self.a_mix.T @ self.a_mix + self.noise["real"] ** 2 * np.eye(d)}
        cov.update({k: self.mix[k].T @ self.mix[k] + self.noise[k] ** 2 * np.eye(d) for k in ("a", "b")})
        if name == "equal_inf":  # b's mean shift scaled so that both runs have the same FID∞
            floor = {k: gaussian_fid(np.zeros(d), cov["real"], np.zeros(d), cov[k]) for k in ("a", "b")}
            target = max(floor.values()) + 0.5
            for k in ("a", "b"):
                self.shift[k] *= np.sqrt((target - floor[k]) / (self.shift[k] ** 2).sum())
        self.fid_inf = {k: gaussian_fid(np.zeros(d), cov["real"], self.shift[k], cov[k]) for k in ("a", "b")}

    def draw(self, rng, n=None):
        """(real, {"a": gen_a, "b": gen_b}) features of n prompts."""
        z = rng.normal(size=(n or self.n, self.d))
        real = z @ self.a_mix + self.noise["real"] * rng.normal(size=z.shape)
        return real, {k: z @ self.mix[k] + self.shift[k] + self.noise[k] * rng.normal(size=z.shape) for k in "ab"}

    def truths(self, fresh, seed=1):
        """The targets: FID∞ (closed form), and over `fresh` independent studies E[FID_n], E[FID_b − FID_a], E[KID]."""
        rng, fids, kids = np.random.default_rng(seed), [], []
        for _ in range(fresh):
            real, gens = self.draw(rng)
            fids.append([reference_fid(real, gens[k]) for k in "ab"])
            kids.append([reference_kid(real, gens[k]) for k in "ab"])
        fids, kids = np.array(fids), np.array(kids)
        return {"fid_inf": self.fid_inf, "fid_n": dict(zip("ab", fids.mean(0))),
                "fid_diff": float((fids[:, 1] - fids[:, 0]).mean()), "fid_inf_diff": self.fid_inf["b"] - self.fid_inf["a"],
                "kid": dict(zip("ab", kids.mean(0))), "kid_diff": float((kids[:, 1] - kids[:, 0]).mean()),
                "fid_n_spread": np.percentile(fids[:, 0], [2.5, 97.5]).tolist(),
                "fid_diff_spread": np.percentile(fids[:, 1] - fids[:, 0], [2.5, 97.5]).tolist()}


#################################################################################
#                                  One study                                    #
#################################################################################

def difference_intervals(real, gens, n_resamples, seed):
    """{"paired"|"unpaired": {"fid"|"kid": (point, interval, p)}} of b − a: prompts drawn jointly for the reference and
    both runs, or each generated set on its own with the shared reference drawn once (compare.py before issue 31)."""
    run = lambda gen, aligned: {"real": real, "generated": gen, "aligned": aligned}  # noqa: E731
    out = {}
    for mode, paired in (("paired", True), ("unpaired", False)):
        result = bootstrap.distance_differences(run(gens["a"], paired), run(gens["b"], paired), n_resamples, seed,
                                                paired=paired)
        out[mode] = {name: (point, bootstrap.percentile_interval(reps), bootstrap.p_value(reps))
                     for name, (point, reps) in result.items()}
    return out


def one_study(scenario, rng, n_resamples, seed):
    """Every interval of one simulated study."""
    real, gens = scenario.draw(rng)
    family = {k: bootstrap.fid_family(real, gens[k], n_resamples, seed, aligned=True) for k in "ab"}
    independent = bootstrap.fid_ci(real, gens["a"], n_resamples, seed)[1]  # reference and images drawn apart
    return family, independent, difference_intervals(real, gens, n_resamples, seed)


def holds(interval, value):
    """Whether the interval holds the value."""
    return interval[0] <= value <= interval[1]


def run_scenario(scenario, studies, n_resamples, fresh, seed):
    """Coverage, mean width and rejection rates of each interval over `studies` studies."""
    start = time.perf_counter()
    truth = scenario.truths(fresh)
    rng, rows = np.random.default_rng(seed), {}

    def count(name, interval, target, significant=None):
        row = rows.setdefault(name, {"held": 0, "width": 0.0, "significant": 0})
        row["held"] += holds(interval, target)
        row["width"] += interval[1] - interval[0]
        row["significant"] += bool(significant)

    bias = []
    for _ in range(studies):
        family, independent, diffs = one_study(scenario, rng, n_resamples, seed)
        count("fid_ci95 (prompts drawn jointly) ∋ E[FID_n]", family["a"]["fid_ci95"], truth["fid_n"]["a"])
        count("fid_ci95 (reference and images drawn apart) ∋ E[FID_n]", independent, truth["fid_n"]["a"])
        count("fid_inf_ci95 ∋ FID∞", family["a"]["fid_inf_ci95"], truth["fid_inf"]["a"])
        count("kid_ci95 ∋ KID", family["a"]["kid_ci95"], truth["kid"]["a"])
        bias.append(family["a"]["fid_bias"])
        for mode in ("paired", "unpaired"):
            _, interval, p = diffs[mode]["fid"]
            count(f"FID b − a, {mode} ∋ E[FID_b − FID_a]", interval, truth["fid_diff"], p < 0.05)
            count(f"FID b − a, {mode} ∋ FID∞_b − FID∞_a", interval, truth["fid_inf_diff"], p < 0.05)
            _, interval, p = diffs[mode]["kid"]
            count(f"KID b − a, {mode} ∋ KID_b − KID_a", interval, truth["kid_diff"], p < 0.05)
    table = {name: {"coverage": row["held"] / studies, "mean_width": row["width"] / studies,
                    "p_below_0.05": row["significant"] / studies} for name, row in rows.items()}
    return {"scenario": scenario.name, "about": scenario.about, "d": scenario.d, "n": scenario.n,
            "studies": studies, "bootstrap": n_resamples, "fresh": fresh,
            "truth": {k: v for k, v in truth.items()}, "mean_fid_bias": float(np.mean(bias)),
            "true_fid_bias": truth["fid_n"]["a"] - truth["fid_inf"]["a"], "intervals": table,
            "seconds": round(time.perf_counter() - start, 1)}


def markdown(result):
    """The result as a Markdown table."""
    lines = [f"**{result['scenario']}** (d = {result['d']}, n = {result['n']}: {result['about']}; "
             f"{result['studies']} studies, {result['bootstrap']} resamples, {result['seconds']} s)",
             "", "| interval ∋ target | coverage | mean width | p < 0.05 |", "| --- | --- | --- | --- |"]
    for name, row in result["intervals"].items():
        lines.append(f"| {name} | {row['coverage']:.3f} | {row['mean_width']:.4g} | {row['p_below_0.05']:.3f} |")
    return "\n".join(lines)


def main(args):
    bootstrap.check_bootstrap(args.bootstrap)
    for name in args.scenarios:
        result = run_scenario(Scenario(name), args.studies, args.bootstrap, args.fresh, args.seed)
        print(json.dumps(result))
        print(markdown(result), flush=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--studies", type=int, default=200, help="simulated studies per scenario")
    parser.add_argument("--bootstrap", type=int, default=200, help="resamples per interval")
    parser.add_argument("--fresh", type=int, default=4000, help="independent studies that give the expected values")
    parser.add_argument("--seed", type=int, default=0, help="seed of the studies (the bootstrap's seed too)")
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    return parser.parse_args(argv)


if __name__ == "__main__":
    exit_on_usage_error("python -m bench.bench_coverage", main, parse_args())
