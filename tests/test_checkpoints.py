"""checkpoints.py and accelerated.py, shared by both trainers: a save killed mid-write leaves the previous checkpoint
intact and the next resume removes it, a failed write stops train_sc_vae.py with its last checkpoint kept, an SC-VAE
checkpoint of the earlier record still resumes, the SC-VAE trainer runs the main trainer's launch check without
importing training.py, and each micro-batch's noise is a function of its key alone (CPU, tiny models)."""
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from PIL import Image
from skimage import data as skdata

import accelerated
import checkpoints
import train_sc_vae
from accelerated import DataProblems
from conftest import train_sc_vae_in_process
from errors import UsageError
from tiny_models import build_tiny_vae

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KILLED_SAVE = """import sys, time
import torch
from accelerate import Accelerator
import checkpoints
torch.manual_seed(0)
accelerator = Accelerator(cpu=True)
model = torch.nn.Linear(64, 64)
model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters()))
checkpoints.save_checkpoint(accelerator, sys.argv[1], 1, {"global_step": 1})
with torch.no_grad():
    model.weight.add_(1.0)
save_state = Accelerator.save_state
def save_then_hang(self, folder, *args, **kwargs):
    save_state(self, folder, *args, **kwargs)
    print("written", folder, flush=True)
    time.sleep(300)  # killed here: checkpoint-2.tmp is on disk, its trainer_state.json and the rename are not
Accelerator.save_state = save_then_hang
checkpoints.save_checkpoint(accelerator, sys.argv[1], 2, {"global_step": 2}, total_limit=1)
"""


def test_a_save_killed_mid_write_leaves_the_previous_checkpoint_and_resume_removes_it(tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                               text=True)
    line = process.stdout.readline()
    assert line.startswith("written") and line.strip().endswith("checkpoint-2.tmp"), line
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1", "checkpoint-2.tmp"]
    assert [step for step, _ in checkpoints.list_checkpoints(out)] == [1]  # nothing pruned, the .tmp never counts
    assert checkpoints.find_checkpoint(out, "latest") == out / "checkpoint-1"

    AcceleratorState._reset_state(reset_partial_state=True)
    torch.manual_seed(0)
    initial = torch.nn.Linear(64, 64)
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(64, 64)
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters()))
    problems = DataProblems({"metadata_lines": [], "missing_images": []})
    assert checkpoints.resume(accelerator, out, "latest", problems) == 1
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1"]  # the killed save is gone
    torch.testing.assert_close(model.weight, initial.weight, rtol=0, atol=0)  # step 1's weights, not the killed ones


@pytest.fixture
def sc_vae_run(tmp_path):
    """run(*flags): one in-process train_sc_vae.py run on a tiny VAE at 32x32 (generator steps only, no LPIPS)."""
    model = tmp_path / "vae"
    build_tiny_vae("sd3", seed=0).save_pretrained(model)
    data = tmp_path / "data"
    data.mkdir()
    for name in ("astronaut", "coffee"):
        Image.fromarray(getattr(skdata, name)()).save(data / f"{name}.png")
    def run(*flags):
        return train_sc_vae_in_process(model, data, tmp_path / "out", "--num_validation_images", "1", *flags)

    return run, tmp_path / "out"


def test_the_sc_vae_trainer_keeps_its_checkpoint_when_a_save_fails_and_cleans_a_killed_one(sc_vae_run, monkeypatch):
    run, out = sc_vae_run
    run("--max_train_steps", "1")
    save_state = Accelerator.save_state

    def full_disk(self, folder, *args, **kwargs):
        save_state(self, folder, *args, **kwargs)  # half written, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Accelerator, "save_state", full_disk)
    with pytest.raises(UsageError, match="Could not write checkpoint .*checkpoint-2 .*checkpoint-1 is intact"):
        run("--max_train_steps", "2", "--resume_from_checkpoint", "latest")
    monkeypatch.undo()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]  # no .tmp left behind

    # A save killed mid-write (its .tmp folder), and step 1's record as the SC-VAE trainer wrote it before both
    # trainers shared DataProblems: the resume removes the one and reads the other.
    shutil.copytree(out / "checkpoint-1", out / "checkpoint-2.tmp")
    state_file = out / "checkpoint-1" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({"global_step": 1, "skipped_images": ["gone.png: truncated"],
                                      "settings": state["settings"]}))
    summary = run("--max_train_steps", "2", "--resume_from_checkpoint", "latest")
    assert summary["resumed_from_step"] == 1 and summary["steps"] == 2
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert summary["skipped_images"] == ["gone.png: truncated"] and summary["skipped"]["corrupt_images"] == 1
    assert json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["corrupt_images"] == [
        "gone.png: truncated"]


def test_the_sc_vae_trainer_refuses_a_launch_whose_processes_would_train_alone(sc_vae_run, monkeypatch):
    run, out = sc_vae_run
    monkeypatch.setattr(accelerated, "launched_processes", lambda: 2)  # two started, each a job of its own
    with pytest.raises(UsageError, match="launch problem: the launcher started 2 processes but each runs alone"):
        run("--max_train_steps", "1")
    assert not out.exists()  # stopped before anything was written


def test_the_sc_vae_trainer_shares_the_main_trainers_setup_without_importing_it():
    import training

    for name in ("make_accelerator", "step_generator", "DataProblems", "save_checkpoint", "resume"):
        assert getattr(train_sc_vae, name) is getattr(training, name), name
    imported = subprocess.run([sys.executable, "-c", "import sys, train_sc_vae; print('training' in sys.modules)"],
                              cwd=ROOT, capture_output=True, text=True)
    assert imported.stdout.strip() == "False", imported.stderr[-2000:]


def test_unreadable_and_small_images_are_named_relative_to_the_data_folder_as_in_the_main_trainer(tmp_path):
    (tmp_path / "sub").mkdir()
    Image.fromarray(skdata.astronaut()).resize((24, 24)).save(tmp_path / "sub" / "small.png")
    (tmp_path / "sub" / "broken.png").write_bytes(b"\x89PNG not an image")
    images = train_sc_vae.TrainImages([tmp_path / "sub" / "broken.png", tmp_path / "sub" / "small.png"], tmp_path,
                                      32, random_flip=False, seed=0)
    sample = images[0, 0]
    assert sample["unreadable"][0].startswith("sub/broken.png: ") and sample["upscaled"] == ["sub/small.png"]


def test_the_noise_of_a_micro_batch_depends_on_the_seed_step_micro_step_and_process_alone():
    def draw(*key):
        return torch.randn(4, generator=accelerated.step_generator(*key, "cpu"))

    base = draw(0, 5, 1, 0)
    torch.testing.assert_close(draw(0, 5, 1, 0), base, rtol=0, atol=0)  # a resumed run draws the same noise
    for other in ((1, 5, 1, 0), (0, 6, 1, 0), (0, 5, 0, 0), (0, 5, 1, 1), (0, 1, 5, 0)):
        assert not torch.equal(draw(*other), base), other
