"""Both trainers with two CPU processes (gloo): one job, caches written once, the data stream dealt without overlap,
2 + 2 steps with a resume equal to 4 steps; and the launch that would start independent runs is refused."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

import training

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = {"astronaut": "a photo of an astronaut in space", "coffee": "a cup of coffee on the table",
          "chelsea": "a photo of a cat", "rocket": "a rocket under the blue sky"}
STEPS, PER_PROCESS_BATCH, PROCESSES = 4, 1, 2

# Runs the trainer unchanged, logging per process every sample the data loader asks for and every cache file written.
HARNESS = '''
import json, os, sys
import training
import {script} as script
from errors import exit_on_usage_error

log = open(os.path.join(sys.argv.pop(1), "rank%s.jsonl" % os.environ.get("RANK", "0")), "a", buffering=1)
get_item, save = training.TrainDataset.__getitem__, training.save_atomically

def logged_get_item(self, key):
    log.write(json.dumps({{"sample": list(key)}}) + "\\n")
    return get_item(self, key)

def logged_save(tensors, path, metadata=None):
    log.write(json.dumps({{"cache_file": str(path)}}) + "\\n")
    return save(tensors, path, metadata)

training.TrainDataset.__getitem__, training.save_atomically = logged_get_item, logged_save
exit_on_usage_error("{script}.py", script.main, script.parse_args())
'''


def make_dataset(folder):
    """Four skimage photos in an imagefolder."""
    from PIL import Image
    from skimage import data as skdata

    folder.mkdir(parents=True)
    lines = []
    for name, caption in PHOTOS.items():
        Image.fromarray(getattr(skdata, name)()).save(folder / f"{name}.png")
        lines.append(json.dumps({"file_name": f"{name}.png", "text": caption}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def free_port():
    """A TCP port nobody listens on now (for the launchers' rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# The two ways to start two CPU processes: torchrun with ACCELERATE_USE_CPU, and `accelerate launch --multi_gpu`,
# which without GPUs would start two independent runs unless the trainer makes them one gloo job.
LAUNCHERS = {
    "torchrun": lambda: ["-m", "torch.distributed.run", "--nproc_per_node", str(PROCESSES),
                         "--master_port", str(free_port())],
    "multi_gpu": lambda: ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(PROCESSES),
                          "--main_process_port", str(free_port())],
    "deepspeed": lambda: ["-m", "accelerate.commands.launch", "--config_file", str(ROOT / "ds_config.yaml"),
                          "--num_processes", str(PROCESSES), "--mixed_precision", "no",
                          "--main_process_port", str(free_port())],
}


def launch(launcher, kind, log_dir, *flags, check=True):
    """Two processes of train_<kind>.py started by `launcher`, through the logging harness."""
    harness = Path(log_dir) / f"harness_{kind}.py"
    harness.parent.mkdir(parents=True, exist_ok=True)
    harness.write_text(HARNESS.format(script=f"train_{kind}"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    if launcher == "torchrun":
        env["ACCELERATE_USE_CPU"] = "true"
    cmd = [sys.executable, *LAUNCHERS[launcher](), str(harness), str(log_dir), *flags]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def train_flags(checkpoint, data_dir, output_dir, *extra):
    return ["--pretrained_model_name_or_path", str(checkpoint), "--instance_data_dir", str(data_dir),
            "--output_dir", str(output_dir), "--resolution", "128", "--train_batch_size", str(PER_PROCESS_BATCH),
            "--max_sequence_length", "32", "--mixed_precision", "no", "--report_to", "none",
            "--max_train_steps", str(STEPS), "--checkpointing_steps", "2", *extra]


def read_log(log_dir, key):
    """{rank: [entries under `key`]} from the harness logs."""
    logs = {}
    for rank in range(PROCESSES):
        path = Path(log_dir) / f"rank{rank}.jsonl"
        entries = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
        logs[rank] = [entry[key] for entry in entries if key in entry]
    return logs


def transformer_difference(dir_a, dir_b):
    weights = "transformer/diffusion_pytorch_model.safetensors"
    a, b = load_file(Path(dir_a) / weights), load_file(Path(dir_b) / weights)
    return max((a[k] - b[k]).abs().max().item() for k in a)


# SD3 through torchrun on pixels; Flux through `accelerate launch --multi_gpu` with cached latents.
RUNS = {"sd3": ("torchrun", ()), "flux": ("multi_gpu", ("--cache_latents",))}


@pytest.fixture(scope="module")
def straight_runs(tiny_ckpts, tmp_path_factory):
    """{kind: output folder} of a 4-step, 2-process run of each trainer, made when first asked for."""
    data_dir = make_dataset(tmp_path_factory.mktemp("data") / "train")
    runs = {}

    def run(kind):
        if kind not in runs:
            launcher, extra = RUNS[kind]
            out = tmp_path_factory.mktemp(f"straight-{kind}")
            launch(launcher, kind, out / "log", *train_flags(tiny_ckpts[kind], data_dir, out / "run", *extra))
            runs[kind] = out
        return runs[kind], data_dir

    return run


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_two_processes_are_one_job_that_writes_caches_once_and_deals_the_data_without_overlap(straight_runs, kind):
    out, _ = straight_runs(kind)
    summary = json.loads((out / "run/train_summary.json").read_text())
    assert summary["engine"]["distributed_type"] == "MULTI_CPU" and summary["engine"]["processes"] == PROCESSES
    assert summary["steps"] == STEPS and len(summary["losses"]) == STEPS

    # Caches written once: each caption embedded by one process only, each latent file written by one process.
    written = read_log(out / "log", "cache_file")
    every_write = written[0] + written[1]
    assert len(every_write) == len(set(every_write))
    assert summary["captions_embedded"] == len(PHOTOS) == len(list((out / "run/cache/embeddings").iterdir()))
    if "--cache_latents" in RUNS[kind][1]:
        latents = [path for path in every_write if "/latents/" in path]
        assert len(latents) == len(PHOTOS) and written[0] and written[1]  # each process encoded its share

    # The data stream dealt without overlap: together the processes saw exactly the 1-process stream.
    seen = read_log(out / "log", "sample")
    assert [len(seen[rank]) for rank in range(PROCESSES)] == [STEPS * PER_PROCESS_BATCH] * PROCESSES
    stream = iter(training.StreamSampler(len(PHOTOS), PER_PROCESS_BATCH, seed=0))
    expected = [list(next(stream)) for _ in range(STEPS * PER_PROCESS_BATCH * PROCESSES)]
    assert not {tuple(s) for s in seen[0]} & {tuple(s) for s in seen[1]}
    assert sorted(seen[0] + seen[1]) == sorted(expected)


@pytest.mark.parametrize("kind", ["sd3", pytest.param("flux", marks=pytest.mark.slow)])
def test_two_process_run_resumed_after_two_steps_equals_four_straight_steps(straight_runs, tiny_ckpts, tmp_path, kind):
    out, data_dir = straight_runs(kind)
    launcher, extra = RUNS[kind]
    straight, resumed = out / "run", tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    shutil.copy(straight / "losses.csv", resumed / "losses.csv")
    launch(launcher, kind, tmp_path / "log", *train_flags(tiny_ckpts[kind], data_dir, resumed, *extra),
           "--data_cache_dir", str(straight / "cache"), "--resume_from_checkpoint", "latest")
    first, again = (json.loads((folder / "train_summary.json").read_text()) for folder in (straight, resumed))
    assert again["resumed_from_step"] == 2 and again["steps"] == STEPS and again["engine"]["processes"] == PROCESSES
    assert not again["text_encoders_loaded"]
    np.testing.assert_allclose(again["losses"], first["losses"], rtol=1e-6)
    assert transformer_difference(resumed, straight) < 1e-7
    assert transformer_difference(straight, tiny_ckpts[kind]) > 0


def test_deepspeed_on_two_cpu_processes_stops_before_training_naming_the_launch_problem(tiny_ckpts, tmp_path):
    # DeepSpeed's multi-process path through accelerate needs GPUs: on the CPU every process would be rank 0 of 1.
    out = tmp_path / "run"
    result = launch("deepspeed", "sd3", tmp_path / "log", *train_flags(tiny_ckpts["sd3"], tmp_path / "no-data", out),
                    check=False)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("train_sd3.py: error: launch problem")]
    assert errors and "2 processes" in errors[0] and "DeepSpeed" in errors[0], result.stderr[-3000:]
    assert not out.exists()  # stopped before writing anything (the data folder is not even read)
