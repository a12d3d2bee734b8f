"""outputs.py and its users: one run per output folder (real concurrent processes), atomic writes (a SIGKILL during a
write), trainers refusing an earlier run or changed settings, every flag checked before any model loads, captions
that are not text, a CSV cut short (tiny models, CPU)."""
import argparse
import json
import os
import signal
import subprocess
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import train_in_process, train_sc_vae_in_process
from PIL import Image
from skimage import data as skdata

import checkpoints
import eval as eval_cli
import eval_vae
import generate_and_eval_fid
import generation
import outputs
import train_flux
import train_sc_vae
import train_sd3
import training
from detail_metrics import evaluate_folder
from errors import UsageError, exit_on_usage_error
from fid_metrics import read_eval_set
from imagefolder import read_metadata
from tiny_models import build_tiny_vae

ROOT = Path(__file__).resolve().parents[1]
TRAINERS = {"sd3": train_sd3, "flux": train_flux}
PHOTOS = {"astronaut": "a photo of an astronaut in space", "chelsea": "a photo of a cat"}
HOLD = """import sys, time, outputs
with outputs.FolderLock(sys.argv[1], "--output_dir", name=sys.argv[2]):
    print("held", flush=True)
    time.sleep(300)
"""


@contextmanager
def held(folder, name=outputs.LOCK_NAME):
    """Another process holding `folder`'s lock (as a running script does) until the block ends; yields it."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), name], cwd=ROOT, stdout=subprocess.PIPE,
                               text=True)
    try:
        assert process.stdout.readline().strip() == "held"
        yield process
    finally:
        process.kill()
        process.wait()


def run_script(*argv):
    """A script run as a user runs it: (exit status, stderr)."""
    done = subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    return done.returncode, done.stderr


def error_lines(stderr, prog):
    """The `prog: error: ...` lines of a script's stderr (what exit_on_usage_error prints)."""
    return [line for line in stderr.splitlines() if line.startswith(f"{prog}: error:")]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """An imagefolder of two photos, and a third line whose caption holds bytes that are not UTF-8."""
    folder = tmp_path_factory.mktemp("data")
    lines = []
    for name, caption in PHOTOS.items():
        Image.fromarray(getattr(skdata, name)()).save(folder / f"{name}.png")
        lines.append(json.dumps({"file_name": f"{name}.png", "text": caption}).encode())
    Image.fromarray(skdata.coffee()).save(folder / "coffee.png")
    lines.append(b'{"file_name": "coffee.png", "text": "a cup of caf\xe9 on the table"}')  # Latin-1, not UTF-8
    (folder / "metadata.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return folder


def train(kind, checkpoint, data_dir, output_dir, *flags, cache=None):
    """One in-process run (plain accelerate, fp32, CPU) at 64x64, one step checkpointed; returns train_summary.json."""
    return train_in_process(kind, checkpoint, data_dir, output_dir, *flags, cache=cache, resolution=64, batch_size=1,
                            tokens=16, steps=1, checkpointing_steps=1)


#################################################################################
#                          One run per output folder                            #
#################################################################################

def test_a_second_run_on_a_held_folder_stops_at_once_naming_the_folder_and_the_other_run(tiny_ckpts, tmp_path):
    folder = tmp_path / "images"
    with held(folder) as other:
        status, stderr = run_script("test_sd3.py", "--checkpoint_path", tiny_ckpts["sd3"], "--prompt", "a cat",
                                    "--height", "64", "--width", "64", "--num_inference_steps", "1", "--device",
                                    "cpu", "--dtype", "fp32", "--save_path", folder)
        assert status == 2 and "Traceback" not in stderr
        [line] = error_lines(stderr, "test_sd3.py")
        assert f"--save_path {folder} is in use by another run (pid {other.pid} on " in line
        assert not list(folder.glob("*.png"))  # nothing generated
        with pytest.raises(UsageError, match=f"--output_dir {tmp_path / 'run'} is in use .*pid "):
            with held(tmp_path / "run"):
                train("sd3", tiny_ckpts["sd3"], tmp_path / "data-unused", tmp_path / "run")
    # The holder was killed (SIGKILL): its lock died with it, and the next run takes the folder.
    assert (folder / outputs.LOCK_NAME).exists()  # the file stays, the lock does not
    with outputs.FolderLock(folder, "--save_path"):
        assert f"pid {os.getpid()} " in (folder / outputs.LOCK_NAME).read_text()
    assert not (folder / outputs.LOCK_NAME).exists()


def test_the_ranks_of_one_launch_share_the_main_process_lock(tmp_path, monkeypatch):
    with held(tmp_path):
        monkeypatch.setenv("RANK", "1")  # another rank of the launch that holds it: takes no lock of its own
        with outputs.FolderLock(tmp_path, "--output_dir") as lock:
            assert lock.fd is None
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(UsageError, match="in use by another run"):
            outputs.FolderLock(tmp_path, "--output_dir").acquire()


def test_eval_scripts_hold_their_outputs_and_stop_with_one_line(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(skdata.camera()).save(images / "camera.png")
    out = tmp_path / "out"
    with held(out, ".summary.json.lock") as other:
        status, stderr = run_script("eval.py", "--img_root", images, "--workers", "1", "--output_json",
                                    out / "summary.json", "--output_csv", out / "rows.csv")
        assert status == 2 and f"pid {other.pid} " in error_lines(stderr, "eval.py")[0]
        assert not (out / "summary.json").exists() and not (out / "rows.csv").exists()
        # Another output in the same folder is another run's: it is not held.
        status, stderr = run_script("eval.py", "--img_root", images, "--workers", "1", "--output_json",
                                    out / "other.json", "--output_csv", out / "other.csv")
        assert status == 0, stderr
    vae = tmp_path / "vae"
    build_tiny_vae("sd3", seed=0).save_pretrained(vae)
    with held(out, ".vae.json.lock"):
        with pytest.raises(UsageError, match="--output_json .* is in use by another run"):
            eval_vae.main(eval_vae.parse_args(["--vae", str(vae), "--data_dir", str(images), "--size", "64",
                                               "--output_json", str(out / "vae.json"), "--metrics", "psnr",
                                               "--device", "cpu", "--num_workers", "0", "--no_progress"]))


def test_every_writing_script_stops_on_a_held_folder_before_loading(tiny_ckpts, dataset, tmp_path, nothing_loads):
    out = tmp_path / "out"
    fid = ["--checkpoint_path", str(tiny_ckpts["sd3"]), "--json_file", str(dataset / "metadata.jsonl"),
           "--save_path", str(out)]
    sc_vae = ["--pretrained_model_name_or_path", str(tiny_ckpts["sd3"]), "--train_data_dir", str(dataset),
              "--output_dir", str(out), "--lpips_scale", "0"]
    with held(out):
        with pytest.raises(UsageError, match="--save_path .*out is in use by another run"):
            generate_and_eval_fid.main(generate_and_eval_fid.parse_args(fid))
        with pytest.raises(UsageError, match="--output_dir .*out is in use by another run"):
            train_sc_vae.main(train_sc_vae.parse_args(sc_vae))


def test_compare_and_each_shard_of_prepare_data_hold_their_output(dataset, tmp_path):
    import compare
    import prepare_data

    out = tmp_path / "cmp"
    with held(out):
        with pytest.raises(UsageError, match="--out .*cmp is in use by another run"):
            compare.main(compare.parse_args(["--folders", str(dataset), str(dataset), "--labels", "a", "b",
                                             "--out", str(out)]))
    filtered = tmp_path / "filtered"
    argv = ["filter", str(dataset), "--out", str(filtered), "--workers", "1", "--shard", "1/2"]
    with outputs.FolderLock(filtered / ".prepare", "--out", name=".run-1-of-2.lock", main=True):
        with pytest.raises(UsageError, match="--out .*prepare is in use by another run"):
            prepare_data.main(prepare_data.parse_args(argv))
        # another shard of the same output is another run: it goes ahead
        prepare_data.main(prepare_data.parse_args(argv[:-1] + ["0/2"]))


#################################################################################
#                                 Atomic writes                                 #
#################################################################################

KILLED_SAVE = """import sys, time
from PIL import Image
import generation
save = Image.Image.save
def save_then_hang(self, fp, *args, **kwargs):
    save(self, fp, *args, **kwargs)
    print("written", fp, flush=True)
    time.sleep(300)  # killed here: the bytes are on disk, the rename has not happened
Image.Image.save = save_then_hang
generation.save_image(Image.new("RGB", (32, 32), (9, 9, 9)), sys.argv[1], {"prompt": "a cat", "seed": 0})
"""


def test_a_run_killed_while_saving_leaves_no_partial_image_and_the_rerun_saves_it(tmp_path):
    path = tmp_path / "out" / "image.png"
    process = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(path)], cwd=ROOT, stdout=subprocess.PIPE,
                               text=True)
    line = process.stdout.readline()
    assert line.startswith("written"), line
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not path.exists()  # never a partial file under the final name
    assert json.loads(generation.sidecar_path(path).read_text())["seed"] == 0  # written first, whole
    generation.save_image(Image.new("RGB", (32, 32), (1, 2, 3)), path, {"prompt": "a cat", "seed": 0})  # no refusal
    assert Image.open(path).getpixel((0, 0)) == (1, 2, 3)
    with pytest.raises(FileExistsError):
        generation.save_image(Image.new("RGB", (32, 32)), path, {"prompt": "a cat", "seed": 0})


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = outputs.write_json(tmp_path / "metrics.json", {"fid": 1.0})
    with pytest.raises(TypeError):
        outputs.write_json(path, {"fid": object()})  # fails half way through
    assert json.loads(path.read_text()) == {"fid": 1.0} and sorted(os.listdir(tmp_path)) == ["metrics.json"]


def test_csv_readers_leave_out_a_last_line_cut_short(tmp_path):
    path = tmp_path / "losses.csv"
    path.write_text("step,loss,lr\n1,0.5,1e-06\n2,0.25,1e-06\n3,0.1,1e-0")  # killed while appending row 3
    assert outputs.read_csv_rows(path) == [{"step": "1", "loss": "0.5", "lr": "1e-06"},
                                           {"step": "2", "loss": "0.25", "lr": "1e-06"}]
    assert training.read_losses(path) == [0.5, 0.25]
    path.write_text("step,loss,lr\n1,0.5,1e-06\n2,0.2\n")  # a row missing a field
    assert training.read_losses(path) == [0.5]
    assert outputs.read_csv_rows(tmp_path / "missing.csv") == []


def test_eval_vae_resumes_a_csv_whose_last_row_was_cut(tmp_path, monkeypatch):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("astronaut", "camera", "coffee"):
        Image.fromarray(getattr(skdata, name)()).save(images / f"{name}.png")
    vae = tmp_path / "vae"
    build_tiny_vae("sd3", seed=0).save_pretrained(vae)

    def run(output):
        return eval_vae.main(eval_vae.parse_args(["--vae", str(vae), "--data_dir", str(images), "--size", "64",
                                                  "--output_json", str(output), "--metrics", "psnr,ssim", "--device",
                                                  "cpu", "--num_workers", "0", "--no_progress"]))

    straight = run(tmp_path / "table2" / "straight.json")  # the output's folder is created
    rows = (tmp_path / "table2" / "straight.csv").read_text()
    cut = tmp_path / "table2" / "cut.csv"
    cut.write_text(rows[:rows.rindex("\n", 0, len(rows) - 1) + 12])  # two rows whole, the third cut short
    outputs.write_json(tmp_path / "table2" / "cut.json", {**straight, "complete": False})
    scored = []
    original = eval_vae.score_image
    monkeypatch.setattr(eval_vae, "score_image", lambda *a: scored.append(1) or original(*a))
    resumed = run(tmp_path / "table2" / "cut.json")
    assert len(scored) == 1 and cut.read_text() == rows  # the cut row redone, each row once
    assert resumed["psnr"] == pytest.approx(straight["psnr"], rel=1e-12) and resumed["complete"]


#################################################################################
#                      Trainers: one run per output folder                      #
#################################################################################

def test_a_trainer_refuses_an_output_dir_holding_a_run_unless_resuming_or_overwriting(tiny_ckpts, dataset, tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    first = train("sd3", tiny_ckpts["sd3"], dataset, out, cache=cache)
    assert first["status"] == "completed"
    state = json.loads((out / "checkpoint-1/trainer_state.json").read_text())
    assert state["settings"]["learning_rate"] == 1e-6 and state["settings"]["max_train_steps"] == 1
    with pytest.raises(UsageError, match=r"--output_dir .*out already holds a run \(train_summary.json, losses.csv"):
        train("sd3", tiny_ckpts["sd3"], dataset, out, "--seed", "5", cache=cache)
    assert json.loads((out / "train_summary.json").read_text()) == first  # nothing touched
    (out / "checkpoint-7").mkdir()  # a later checkpoint of the old run: must not survive an overwrite
    second = train("sd3", tiny_ckpts["sd3"], dataset, out, "--seed", "5", "--overwrite_output_dir", cache=cache)
    assert second["settings"]["seed"] == 5 and second["resumed_from_step"] == 0
    assert sorted(p.name for _, p in checkpoints.list_checkpoints(out)) == ["checkpoint-1"]
    assert json.loads((out / "checkpoint-1/trainer_state.json").read_text())["settings"]["seed"] == 5
    with pytest.raises(UsageError, match="give one of them"):
        train("sd3", tiny_ckpts["sd3"], dataset, out, "--overwrite_output_dir", "--resume_from_checkpoint", "latest")


def test_a_resume_refuses_changed_defining_flags_and_allows_extending_ones(tiny_ckpts, dataset, tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    train("sd3", tiny_ckpts["sd3"], dataset, out, cache=cache)
    with pytest.raises(UsageError) as error:
        train("sd3", tiny_ckpts["sd3"], dataset, out, "--max_train_steps", "2", "--learning_rate", "1e-4",
              "--seed", "3", "--resume_from_checkpoint", "latest", cache=cache)
    message = str(error.value)
    assert "--learning_rate: 1e-06 -> 0.0001" in message and "--seed: 0 -> 3" in message
    assert "--max_train_steps" not in message and "--accept_changed_settings" in message
    assert not (out / "checkpoint-2").exists()
    extended = train("sd3", tiny_ckpts["sd3"], dataset, out, "--max_train_steps", "2", "--checkpointing_steps", "2",
                     "--dataloader_num_workers", "0", "--resume_from_checkpoint", "latest", cache=cache)
    assert extended["resumed_from_step"] == 1 and extended["steps"] == 2 and extended["status"] == "completed"
    accepted = train("sd3", tiny_ckpts["sd3"], dataset, out, "--max_train_steps", "3", "--learning_rate", "1e-4",
                     "--resume_from_checkpoint", "latest", "--accept_changed_settings", cache=cache)
    assert accepted["resumed_from_step"] == 2 and accepted["settings"]["learning_rate"] == 1e-4


def test_the_sc_vae_trainer_refuses_an_earlier_run_and_changed_settings(tmp_path, dataset):
    model = tmp_path / "vae"
    build_tiny_vae("sd3", seed=0).save_pretrained(model)
    def run(*extra):
        return train_sc_vae_in_process(model, dataset, tmp_path / "out", "--max_train_steps", "1", *extra)

    run()
    assert json.loads((tmp_path / "out/checkpoint-1/trainer_state.json").read_text())["settings"]["resolution"] == 32
    with pytest.raises(UsageError, match="already holds a run"):
        run()
    with pytest.raises(UsageError, match="--learning_rate: 1e-05 -> 0.001"):
        run("--learning_rate", "1e-3", "--resume_from_checkpoint", "latest", "--max_train_steps", "2")
    summary = run("--resume_from_checkpoint", "latest", "--max_train_steps", "2")
    assert summary["resumed_from_step"] == 1 and summary["steps"] == 2


def test_completed_is_written_only_after_the_final_save(tiny_ckpts, dataset, tmp_path, monkeypatch, caplog):
    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(training, "save_pipeline", full_disk)
    with pytest.raises(UsageError, match="Could not save the final model .*No space left"):
        train("sd3", tiny_ckpts["sd3"], dataset, tmp_path / "full", cache=tmp_path / "cache")
    summary = json.loads((tmp_path / "full/train_summary.json").read_text())
    assert summary["status"].startswith("stopped: could not save the final model")
    monkeypatch.undo()
    # A run killed while it trains (here: interrupted) leaves "running", never an earlier run's "completed":
    train("sd3", tiny_ckpts["sd3"], dataset, tmp_path / "killed", cache=tmp_path / "cache")
    monkeypatch.setattr(training, "update_weights", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        train("sd3", tiny_ckpts["sd3"], dataset, tmp_path / "killed", "--max_train_steps", "2",
              "--resume_from_checkpoint", "latest", cache=tmp_path / "cache")
    summary = json.loads((tmp_path / "killed/train_summary.json").read_text())
    assert summary["status"] == "running" and summary["resumed_from_step"] == 1
    monkeypatch.undo()
    caplog.set_level("INFO")
    lora = train("sd3", tiny_ckpts["sd3"], dataset, tmp_path / "lora", "--lora_rank", "4", cache=tmp_path / "cache")
    assert lora["status"] == "completed" and (tmp_path / "lora/pytorch_lora_weights.safetensors").is_file()
    assert "Saved the LoRA adapter to" in caplog.text and "fine-tuned pipeline" not in caplog.text


#################################################################################
#                Every flag checked before anything loads or is written         #
#################################################################################

@pytest.fixture
def nothing_loads(monkeypatch):
    """Every model loader and the trainers' accelerator fail the test if reached."""
    def reached(*args, **kwargs):
        raise AssertionError("a model was loaded before the flags were checked")

    for module, name in ((generation, "load_pipeline"), (generate_and_eval_fid, "load_pipeline"),
                         (generate_and_eval_fid, "MetricModels"), (eval_vae, "load_vae"), (eval_vae, "load_lpips"),
                         (train_sc_vae, "load_vaes"), (training, "make_accelerator"), (eval_cli, "evaluate_folder")):
        monkeypatch.setattr(module, name, reached)


def test_each_bad_flag_is_one_usage_error_naming_it_before_any_model_loads(tiny_ckpts, dataset, tmp_path,
                                                                           nothing_loads):
    sd3, out = tiny_ckpts["sd3"], tmp_path / "out"
    train_flags = ["--pretrained_model_name_or_path", str(sd3), "--instance_data_dir", str(dataset), "--output_dir",
                   str(out)]
    sc_vae = ["--pretrained_model_name_or_path", str(sd3), "--train_data_dir", str(dataset), "--output_dir", str(out),
              "--lpips_scale", "0"]
    vae = ["--vae", str(sd3), "--data_dir", str(dataset), "--output_json", str(out / "v.json")]
    generate = ["--checkpoint_path", str(sd3), "--prompt", "a cat", "--save_path", str(out), "--device", "cpu"]
    eval_set = tmp_path / "eval.jsonl"
    eval_set.write_text(json.dumps({"file_name": "astronaut.png", "text": "a cat"}) + "\n")
    fid = ["--checkpoint_path", str(sd3), "--json_file", str(eval_set), "--save_path", str(out)]
    cases = [
        (train_sd3, train_flags + ["--dataloader_num_workers", "-1"], "--dataloader_num_workers must be at least 0"),
        (train_sd3, train_flags + ["--max_sequence_length", "0"], "--max_sequence_length must be at least 1"),
        (train_sd3, train_flags + ["--validation_steps", "0"], "--validation_steps must be at least 1"),
        (train_flux, train_flags, f"{sd3} holds a StableDiffusion3Pipeline pipeline.*FLUX.1-dev.*use train_sd3.py"),
        (train_sc_vae, sc_vae + ["--max_train_steps", "0"], "--max_train_steps must be at least 1, got 0"),
        (train_sc_vae, sc_vae + ["--dataloader_num_workers", "-2"], "--dataloader_num_workers must be at least 0"),
        (eval_vae, vae + ["--max_images", "0"], "--max_images must be at least 1, got 0"),
        (eval_vae, vae + ["--save_every", "0"], "--save_every must be at least 1"),
        (eval_vae, vae + ["--output_json", str(eval_set / "v.json")], "--output_json .*eval.jsonl.*cannot create"),
        (generate_and_eval_fid, fid + ["--num_inference_steps", "0"], "--num_inference_steps must be at least 1"),
        (generate_and_eval_fid, fid + ["--max_samples", "0"], "--max_samples must be at least 1"),
        (generate_and_eval_fid, fid + ["--grid", "0"], "--grid must be at least 1"),
        (generate_and_eval_fid, fid, "Metric model weights are missing"),  # checked under the lock: out removed
    ]
    for module, argv, message in cases:
        args = module.parse_args(argv)
        with pytest.raises(UsageError, match=message):
            module.main(args)
        assert not out.exists(), (argv, message)  # no state from a run that failed its checks
    for flags, message in ((["--num_images", "0"], "--num_images must be at least 1"),
                           (["--num_inference_steps", "0"], "--num_inference_steps must be at least 1")):
        with pytest.raises(UsageError, match=message):
            generation.main(generation.parse_args("sd3", generate + flags))
        assert not out.exists()


def test_eval_py_refuses_bad_numbers_in_one_line_before_scoring(tmp_path, capsys, nothing_loads):
    base = dict(img_root=str(tmp_path), prop="entropy", patch_size=64, size=None, recursive=False, cr_mode="encode",
                jpeg_quality=95, device="cpu", workers=1, output_csv=None, output_json=None, bootstrap=0,
                bootstrap_seed=0)
    for change, message in (({"jpeg_quality": 500}, "--jpeg_quality must be from 1 to 100"),
                            ({"bootstrap": -1}, "--bootstrap -1"),
                            ({"bootstrap": 50}, "--bootstrap 50: give 0 (no intervals) or at least 200"),
                            ({"jpeg_quality": 0}, "--jpeg_quality must be from 1 to 100"),
                            ({"workers": 0}, "--workers must be at least 1"),
                            ({"patch_size": 0}, "--patch_size must be at least 1"),
                            ({"output_json": str(tmp_path / "f.txt" / "x.json")}, "cannot create the folder")):
        (tmp_path / "f.txt").write_text("a file, not a folder")
        with pytest.raises(SystemExit) as exit_info:
            exit_on_usage_error("eval.py", eval_cli.main, argparse.Namespace(**{**base, **change}))
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and message in err


def test_the_wrong_pipeline_is_one_line_under_accelerate_launch(tiny_ckpts, dataset, tmp_path):
    status, stderr = run_script("-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu",
                                "--mixed_precision", "no", "--main_process_port", "0", ROOT / "train_flux.py",
                                "--pretrained_model_name_or_path", tiny_ckpts["sd3"], "--instance_data_dir", dataset,
                                "--output_dir", tmp_path / "out", "--report_to", "none")
    assert status != 0
    [line] = error_lines(stderr, "train_flux.py")
    assert "holds a StableDiffusion3Pipeline pipeline" in line and "use train_sd3.py" in line
    assert not (tmp_path / "out").exists()


#################################################################################
#                    Captions and prompts that are not text                     #
#################################################################################

def test_captions_that_are_not_utf8_are_skipped_and_counted_by_name(tiny_ckpts, dataset, tmp_path):
    records, found = read_metadata(dataset)
    assert [r["file_name"] for r in records] == ["astronaut.png", "chelsea.png"]
    assert found["metadata_lines"] == ["line 3: 'coffee.png': not valid UTF-8 text"]
    summary = train("sd3", tiny_ckpts["sd3"], dataset, tmp_path / "out", cache=tmp_path / "cache")
    assert summary["skipped"]["metadata_lines"] == 1 and summary["train_images"] == 2
    assert "coffee.png" in summary["problems"]["metadata_lines"][0]
    assert summary["captions_embedded"] == 2  # the bad caption was never embedded


def test_a_prompt_file_with_bytes_that_are_not_utf8_is_one_error_naming_the_line(tmp_path, dataset):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("a cat\n".encode() + b"un caf\xe9\n" + b"a dog\n")
    with pytest.raises(UsageError, match=r"--prompt_file .*prompts.txt: line 2 is not valid UTF-8 text"):
        generation.read_prompts(prompt_file=prompts)
    prompts.write_text("a cat\nun café\n", encoding="utf-8")
    assert generation.read_prompts(prompt_file=prompts) == ["a cat", "un café"]
    with pytest.raises(UsageError, match="line 3: 'coffee.png': not valid UTF-8 text"):
        read_eval_set(dataset / "metadata.jsonl")  # generate_and_eval_fid's prompts


#################################################################################
#                               Newcomer's trips                                #
#################################################################################

def test_eval_py_ignores_the_json_and_csv_files_of_a_generating_run_quietly(tmp_path):
    for i, name in enumerate(("astronaut", "camera")):
        Image.fromarray(getattr(skdata, name)()).save(tmp_path / f"{i:05d}.png")
        (tmp_path / f"{i:05d}.json").write_text("{}")
    for name in ("metrics.json", "generation_settings.json", "per_image.csv", "metadata.jsonl"):
        (tmp_path / name).write_text("{}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary, rows = evaluate_folder(tmp_path, workers=1, progress=False)
    assert not [w for w in caught if "skipping" in str(w.message)]
    assert summary["n_images"] == 2 and summary["n_skipped"] == 0 and [r["file"] for r in rows] == ["00000.png",
                                                                                                  "00001.png"]
