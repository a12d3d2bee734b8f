"""What the study's tests share: two runs of small photos (a sharp, b blurred) with prompts, a study made from them,
and the server run on loopback, in a thread of the test (fast) or as `study.py serve` in a process of its own."""
import csv
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image, ImageFilter
from skimage import data

from human_eval import assign, design, server, store

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "horse", "hubble_deep_field", "immunohistochemistry")
XSS_PROMPT = "<img src=x onerror=alert(1)> a photo"


def photo(k, size):
    """The k-th test photo (skimage), RGB, cropped and resized to size (width, height)."""
    image = Image.fromarray(np.asarray(getattr(data, PHOTOS[k % len(PHOTOS)])())).convert("RGB")
    return image.resize(size, Image.Resampling.BICUBIC)


def make_runs(root, n=4, size=(96, 72), prompts=True):
    """Folders a (photos) and b (the same photos blurred: a has the detail), file names 00000.png...; a's
    per_image.csv gives each its prompt (the first one is an HTML injection attempt)."""
    folders = [Path(root) / "a", Path(root) / "b"]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for k in range(n):
        image = photo(k, size)
        image.save(folders[0] / f"{k:05d}.png")
        image.filter(ImageFilter.GaussianBlur(2)).save(folders[1] / f"{k:05d}.png")
        rows.append({"file": f"{k:05d}.png", "prompt": XSS_PROMPT if k == 0 else f"a photo of {PHOTOS[k % 8]}"})
    if prompts:
        with open(folders[0] / "per_image.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, ["file", "prompt"])
            writer.writeheader()
            writer.writerows(rows)
    return folders


def make_study(root, n=4, raters=2, size=(96, 72), **options):
    """(study folder, [(rater, token)]) of a pairwise study of make_runs' folders."""
    folders = make_runs(Path(root) / "runs", n, size)
    study = Path(root) / "study"
    design.create_pairwise(study, folders, ["a", "b"], list(store.PAIRWISE_QUESTIONS), **options)
    conn = store.connect(study)
    added = assign.add_raters(conn, raters) if raters else []
    conn.close()
    return study, added


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadServer:
    """The study's app under uvicorn in a thread of this process, on a free loopback port (`with` starts/stops)."""

    def __init__(self, study, **options):
        import uvicorn

        config = uvicorn.Config(server.create_app(study, **options), host="127.0.0.1", port=0, log_level="warning",
                                timeout_graceful_shutdown=10)  # a request left hanging cannot hold the test
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(20)


def start_serve_process(study, port):
    """`python study.py serve STUDY --port PORT` in a process of its own, once it answers; the Popen."""
    process = subprocess.Popen([sys.executable, str(ROOT / "study.py"), "serve", str(study), "--port", str(port)],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/api/next", timeout=1)
            return process
        except httpx.TransportError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise AssertionError(f"study.py serve did not start: {process.stderr.read().decode()[-2000:]}")
            time.sleep(0.05)


def answer_everything(client, token, choose):
    """Answer a rater's tasks through the API until none is left; choose(task) -> answers. [(task, answers)]."""
    headers = {"Authorization": f"Bearer {token}"}
    done = []
    while True:
        task = client.get("/api/next", headers=headers).json()["task"]
        if task is None:
            return done
        answers = choose(task)
        assert client.post("/api/answer", headers=headers, json={"task": task["id"], "answers": answers}).status_code \
            == 200
        done.append((task, answers))
