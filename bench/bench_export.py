"""Benchmark export.py's memory: the peak RSS of exporting the real-width shallow SD3 and Flux transformers (one and
two blocks of each kind), against the weights' size and against loading every shard and saving one file
(safetensors' load_file + save_file, what an exporter that is not streaming does), measured in the same run.

Each measurement runs in a fresh interpreter: its growth is the RSS high-water mark (VmHWM; not ru_maxrss, which
keeps the RSS of the process that started it) above the RSS once export.py and its libraries are imported. The
per-block growth is the difference between the two depths.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from errors import HelpFormatter, exit_on_usage_error

ROOT = Path(__file__).resolve().parents[1]
MIB = 2 ** 20


def current_rss():
    """Resident set size of this process, in bytes."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss():
    """This process's RSS high-water mark (VmHWM), in bytes."""
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def measure(task):
    """In this (fresh) process: import, note the RSS, run `task` ({"export": argv} or {"load_and_save": [folder,
    out]}), return the RSS before, the high-water mark and the seconds."""
    import export  # noqa: F401 (the libraries an export loads)

    base = current_rss()
    start = time.perf_counter()
    if "export" in task:
        export.main(export.parse_args(task["export"]))
    else:  # the reference: every tensor in memory, then one file
        from safetensors.torch import load_file, save_file

        folder, out = map(Path, task["load_and_save"])
        tensors = {}
        for shard in sorted(folder.glob("*.safetensors")):
            tensors.update(load_file(shard))
        save_file(tensors, out)
    seconds = time.perf_counter() - start
    peak = peak_rss()
    return {"base_rss": base, "peak_rss": peak, "growth": peak - base, "seconds": round(seconds, 2)}


def run(task):
    """`measure(task)` in a fresh interpreter (its own high-water mark, its own imports)."""
    done = subprocess.run([sys.executable, "-m", "bench.bench_export", "--measure", json.dumps(task)], cwd=ROOT,
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{task} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def weight_bytes(transformer_folder):
    return sum(f.stat().st_size for f in Path(transformer_folder).glob("*.safetensors"))


def main(args):
    if args.measure:  # worker
        print(json.dumps(measure(json.loads(args.measure))))
        return
    from tiny_models import save_real_width_transformers

    print(json.dumps({"machine": os.uname().nodename, "cpus": os.cpu_count(), "load_avg": os.getloadavg()}))
    with tempfile.TemporaryDirectory(dir=args.work_dir) as work:
        work = Path(work)
        growth = {}
        for blocks in (1, 2):
            for kind, folder in save_real_width_transformers(work / f"blocks-{blocks}", blocks=blocks).items():
                weights = weight_bytes(folder / "transformer")
                tasks = {fmt: {"export": ["--checkpoint_path", str(folder), "--format", fmt.split("-")[0], "--out",
                                          str(work / f"{kind}-{blocks}-{fmt}.{'gguf' if 'gguf' in fmt else 'safetensors'}")]
                               + (["--quant", "Q8_0"] if fmt == "gguf-Q8_0" else [])}
                         for fmt in ("original", "gguf-Q8_0")}
                tasks["load_file+save_file"] = {"load_and_save": [str(folder / "transformer"), str(work / "ref.st")]}
                for name, task in tasks.items():
                    result = run(task)
                    growth[kind, blocks, name] = result["growth"]
                    print(json.dumps({"model": f"real-width {kind}", "blocks": blocks, "how": name,
                                      "weights_mib": round(weights / MIB), "base_rss_mib": round(result["base_rss"] / MIB),
                                      "peak_rss_mib": round(result["peak_rss"] / MIB),
                                      "growth_mib": round(result["growth"] / MIB),
                                      "growth_over_weights": round(result["growth"] / weights, 3),
                                      "seconds": result["seconds"]}), flush=True)
                    for out in work.glob(f"{kind}-{blocks}-*"):
                        out.unlink()
            for leftover in (work / f"blocks-{blocks}").glob("*/transformer/*.safetensors"):
                leftover.unlink()
        for (kind, blocks, name), value in sorted(growth.items()):
            if blocks == 2:
                print(json.dumps({"model": f"real-width {kind}", "how": name, "growth_per_block_mib":
                                  round((value - growth[kind, 1, name]) / MIB)}))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--work_dir", default=None, help="where the models and exports are written (4 GB at most)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    exit_on_usage_error("python -m bench.bench_export", main, parse_args())
