"""Benchmarks: run each from the repository root as `python -m bench.NAME` (e.g. `python -m bench.bench_vae`)."""
