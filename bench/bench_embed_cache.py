"""Peak host RAM while embedding N captions: training.cache_embeddings (one file per caption, written batch by batch)
against the reference of holding every embedding in memory (what the authors' dataset does). Tiny SD3 encoders;
each (N, mode) runs in a fresh subprocess so that its peak RSS is its own.

    python -m bench.bench_embed_cache [--counts 100 300 1000]
"""
import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

from errors import HelpFormatter, exit_on_usage_error

ROOT = Path(__file__).resolve().parents[1]
# Real per-caption embedding sizes in bf16 at the trainers' default T5 length, 77 for both models (models.py,
# PROTOCOL.md §4, §11): SD3 (77 CLIP + 77 T5 tokens) x 4096 + pooled 2048; Flux 77 T5 tokens x 4096 + pooled 768.
# Aesthetic-4K train has 12,015 captions.
REAL_BYTES_PER_CAPTION = {"sd3": ((77 + 77) * 4096 + 2048) * 2, "flux": (77 * 4096 + 768) * 2}
TRAIN_CAPTIONS = 12015


def captions(n, seed=0):
    """n distinct captions made of words the tiny tokenizers know."""
    from tiny_models import WORDS

    rng = random.Random(seed)
    return [f"{i} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30))) for i in range(n)]


def rss_mib(field):
    """VmRSS (current) or VmHWM (peak) of this process from /proc/self/status, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def reset_peak_rss():
    """Reset this process's peak RSS (VmHWM) to its current RSS, so the peak that follows is the work's own."""
    Path("/proc/self/clear_refs").write_text("5")


def child(args):
    """Embed args.n captions in this process (cache or memory mode); print one JSON line with the peak RSS."""
    import torch

    import training
    from models import MODELS

    torch.set_num_threads(1)
    texts = captions(args.n)
    sd3 = MODELS["sd3"]
    load = partial(training.load_text_encoders, sd3.pipeline_class, args.checkpoint, torch.float32, "cpu")
    reset_peak_rss()  # after the imports, whose transient peak would otherwise hide everything else
    baseline, start = rss_mib("VmRSS"), time.perf_counter()
    if args.mode == "cache":
        files = training.embedding_files(texts, args.cache_dir, "bench", 77, torch.float32)
        training.cache_embeddings(files, load, sd3.encode_prompts, 77)
        stored = sum(f.stat().st_size for f in files.values())
    else:  # reference: every caption's embeddings kept in host memory, as the authors' dataset holds them
        pipe, held = load(), []
        for i in range(0, len(texts), training.ENCODE_BATCH_SIZE):
            with torch.no_grad():
                out = sd3.encode_prompts(pipe, texts[i:i + training.ENCODE_BATCH_SIZE], 77)
            held += [{k: v[j].clone() for k, v in out.items()} for j in range(len(out["prompt_embeds"]))]
        stored = sum(t.numel() * t.element_size() for item in held for t in item.values())
    seconds, peak = time.perf_counter() - start, rss_mib("VmHWM")
    print(json.dumps({"n": args.n, "mode": args.mode, "peak_rss_mib": round(peak, 1),
                      "peak_over_start_mib": round(peak - baseline, 1), "embedding_mib": round(stored / 2**20, 2),
                      "seconds": round(seconds, 2)}))


def run_child(checkpoint, cache_dir, n, mode):
    """One fresh subprocess; returns its JSON result."""
    out = subprocess.run([sys.executable, "-m", "bench.bench_embed_cache", "--child", "--n", str(n), "--mode", mode,
                          "--checkpoint", str(checkpoint), "--cache_dir", str(cache_dir)], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(args):
    if args.child:
        return child(args)
    from tiny_models import save_tiny_pipelines

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = save_tiny_pipelines(Path(tmp) / "ckpt")["sd3"]
        results = {}
        for n in args.counts:
            for mode in ("cache", "memory"):
                result = results[n, mode] = run_child(checkpoint, Path(tmp) / f"cache-{n}", n, mode)
                print(json.dumps(result))
        low, high = min(args.counts), max(args.counts)
        for mode in ("cache", "memory"):
            a, b = results[low, mode], results[high, mode]
            print(json.dumps({
                "mode": mode,
                f"peak_rss_ratio_{high}_over_{low}": round(b["peak_rss_mib"] / a["peak_rss_mib"], 3),
                f"peak_over_start_ratio_{high}_over_{low}":
                    round(b["peak_over_start_mib"] / a["peak_over_start_mib"], 3),
            }))
        print(json.dumps({f"memory_over_cache_peak_over_start_at_{high}": round(
            results[high, "memory"]["peak_over_start_mib"] / results[high, "cache"]["peak_over_start_mib"], 3)}))
    for model, size in REAL_BYTES_PER_CAPTION.items():  # what the in-memory reference would hold at full scale
        held = round(size * TRAIN_CAPTIONS / 2**30, 1)
        print(json.dumps({"model": model, "bf16_mib_per_caption": round(size / 2**20, 3),
                          f"held_in_memory_gib_for_{TRAIN_CAPTIONS}_captions": held}))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[100, 300, 1000], help="numbers of captions")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["cache", "memory"], help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--cache_dir", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    exit_on_usage_error("python -m bench.bench_embed_cache", main, parse_args())
