"""The study server under load: answers/s and latency with N raters answering at once on loopback (`study.py serve`
in its own process, as a lab runs it), beside the disk's own ceiling measured in the same run: commits/s of one
SQLite writer in WAL mode with synchronous=FULL, in the same folder. Every acknowledged answer is then looked up in
the study's database (none may be missing).

    python -m bench.bench_study [--raters 16] [--pairs 100] [--root /tmp/bench_study]
    python -m bench.bench_study --interval_table       # the 95 % interval of a win rate by prompts and raters

--interval_table simulates studies instead (no server): the mean half-width of the win-rate interval (prompts and
raters resampled) for a range of prompts and raters, with and without differences between prompts and raters.
"""
import argparse
import http.client
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image
from scipy.stats import norm

from errors import HelpFormatter, UsageError, exit_on_usage_error
from human_eval import assign, design, stats, store

ROOT = Path(__file__).resolve().parents[1]


def report(**fields):
    print(json.dumps(fields), flush=True)


#################################################################################
#                                  The ceiling                                  #
#################################################################################

def disk_ceiling(folder, seconds):
    """Commits per second of one writer inserting one row per transaction (WAL, synchronous=FULL) in `folder`."""
    path = Path(folder) / "ceiling.sqlite"
    conn = store.configure(sqlite3.connect(path, isolation_level=None))
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, value TEXT)")
    commits, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        with store.transaction(conn):
            conn.execute("INSERT INTO t (value) VALUES ('left')")
        commits += 1
    elapsed = time.perf_counter() - start
    conn.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return commits / elapsed


#################################################################################
#                                   The load                                    #
#################################################################################

def make_study(root, pairs, raters, seed=0):
    """A pairwise study of `pairs` small noise images per side (PNG), with `raters` raters; their tokens."""
    rng = np.random.default_rng(seed)
    folders = [root / "a", root / "b"]
    for folder in folders:
        folder.mkdir(parents=True)
        for k in range(pairs):
            Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(folder / f"{k:05d}.png")
    design.create_pairwise(root / "study", folders, ["a", "b"], ["aesthetics", "fine_details"])
    conn = store.connect(root / "study")
    tokens = [token for _, token in assign.add_raters(conn, raters)]
    conn.close()
    return root / "study", tokens


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(study, port):
    """`python study.py serve` in a process of its own, once it answers."""
    process = subprocess.Popen([sys.executable, "study.py", "serve", str(study), "--port", str(port)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("study.py serve did not start")


def rater(port, token, record):
    """One rater on a keep-alive connection: GET /api/next, POST the answer, until done. Appends (kind, seconds,
    finished at) per request and (task, answers) per acknowledged answer to `record`."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    while True:
        start = time.perf_counter()
        conn.request("GET", "/api/next", headers=headers)
        task = json.loads(conn.getresponse().read())["task"]
        record["latency"].append(("next", time.perf_counter() - start))
        if task is None:
            conn.close()
            return
        answers = {q: "left" if (task["id"] + k) % 2 else "right" for k, q in enumerate(task["questions"])}
        start = time.perf_counter()
        conn.request("POST", "/api/answer", body=json.dumps({"task": task["id"], "answers": answers}), headers=headers)
        response = conn.getresponse()
        response.read()
        now = time.perf_counter()
        record["latency"].append(("answer", now - start))
        if response.status == 200:
            record["acked"].append((task["id"], answers, now))


def load(study, tokens):
    """Every rater answers every task at once; the figures, and the acknowledged answers missing from the study."""
    port = free_port()
    server = start_server(study, port)
    try:
        process = psutil.Process(server.pid)
        cpu_before = process.cpu_times()
        record = {"latency": [], "acked": []}
        threads = [threading.Thread(target=rater, args=(port, token, record)) for token in tokens]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - start
        cpu = sum(process.cpu_times()[:2]) - sum(cpu_before[:2])
    finally:
        server.terminate()
        server.wait(30)
    conn = store.connect(study)
    stored = {(r["task"], r["question"]): r["answer"] for r in store.answer_rows(conn)}
    missing = sum(stored.get((task, q)) != a for task, answers, _ in record["acked"] for q, a in answers.items())
    by_kind = {kind: np.array([s for k, s in record["latency"] if k == kind]) * 1000 for kind in ("next", "answer")}
    return {"raters": len(tokens), "answers": len(record["acked"]), "wall_s": round(wall, 2),
            "answers_per_s": round(len(record["acked"]) / wall, 1),
            "answer_p50_ms": round(float(np.percentile(by_kind["answer"], 50)), 2),
            "answer_p99_ms": round(float(np.percentile(by_kind["answer"], 99)), 2),
            "next_p50_ms": round(float(np.percentile(by_kind["next"], 50)), 2),
            "next_p99_ms": round(float(np.percentile(by_kind["next"], 99)), 2),
            "server_cpu_s_per_s": round(cpu / wall, 2), "acknowledged_but_missing": missing}


#################################################################################
#                            How wide the intervals are                         #
#################################################################################

def interval_table(trials, resamples, win_rate=0.6):
    """Mean half-width of the win-rate interval for prompts × raters, with prompts and raters alike (binomial votes)
    or differing (σ 0.5 between prompts and 0.3 between raters on the probit scale); population rate `win_rate`."""
    rng = np.random.default_rng(0)
    for prompt_sd, rater_sd in ((0.0, 0.0), (0.5, 0.3)):
        mu = norm.ppf(win_rate) * np.sqrt(1 + prompt_sd ** 2 + rater_sd ** 2)
        for prompts in (56, 112, 224):
            for raters in (1, 5, 10, 20):
                widths = []
                for trial in range(trials):
                    p = norm.cdf(mu + rng.normal(0, prompt_sd, (prompts, 1)) + rng.normal(0, rater_sd, (1, raters)))
                    votes = (rng.random((prompts, raters)) < p).astype(float)
                    low, high = stats.win_rate(votes, np.ones_like(votes), ["a", "b"], resamples,
                                               trial)["win_rate_a_ci95"]
                    widths.append((high - low) / 2)
                report(bench="win_rate_interval", prompts=prompts, raters=raters, prompt_sd=prompt_sd,
                       rater_sd=rater_sd, win_rate=win_rate, half_width=round(float(np.mean(widths)), 3),
                       trials=trials)


def main(args):
    if args.interval_table:
        return interval_table(args.trials, args.resamples)
    if args.raters < 1 or args.pairs < 1:
        raise UsageError("--raters and --pairs must be at least 1")
    root = Path(args.root)
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    report(bench="disk_ceiling", folder=str(root), commits_per_s=round(disk_ceiling(root, args.ceiling_seconds)),
           what="one SQLite writer, one row per COMMIT, WAL, synchronous=FULL")
    study, tokens = make_study(root, args.pairs, args.raters)
    report(bench="study_server", pairs=args.pairs, load_average_1min=round(os.getloadavg()[0], 2),
           **load(study, tokens))
    report(bench="disk_ceiling_after", commits_per_s=round(disk_ceiling(root, args.ceiling_seconds)))
    shutil.rmtree(root)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--raters", type=int, default=16, help="raters answering at once")
    parser.add_argument("--pairs", type=int, default=100, help="pairs per rater (each answered once)")
    parser.add_argument("--root", default="/tmp/bench_study", help="scratch folder (removed at the end)")
    parser.add_argument("--ceiling_seconds", type=float, default=3.0, help="seconds of the disk-ceiling measure")
    parser.add_argument("--interval_table", action="store_true", help="simulate interval widths instead")
    parser.add_argument("--trials", type=int, default=200, help="--interval_table: simulated studies per cell")
    parser.add_argument("--resamples", type=int, default=1000, help="--interval_table: bootstrap resamples")
    return parser.parse_args(argv)


if __name__ == "__main__":
    exit_on_usage_error("python -m bench.bench_study", main, parse_args())
