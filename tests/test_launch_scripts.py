"""train_sd3.sh / train_flux.sh hand accelerate the authors' settings, with a global batch of 32."""
import subprocess
import sys

import pytest

import train_flux
import train_sd3
from conftest import recorded, recording_launch

TRAINERS = {"train_sd3.sh": train_sd3, "train_flux.sh": train_flux}


def _launch(repo_root, tmp_path, script, **env):
    """Run a launch script whose `accelerate` and flag check record their arguments instead of training: (result,
    accelerate's arguments); the check's are in recorded(tmp_path, "python")."""
    result = subprocess.run(["bash", str(repo_root / script), "--report_to", "none"],
                            env={**recording_launch(tmp_path), **env}, capture_output=True, text=True)
    return result, recorded(tmp_path, "accelerate")


def _flag(args, name):
    return args[args.index(name) + 1]


@pytest.mark.parametrize("script, per_device, processes, accumulation, seq_len, weighting", [
    ("train_sd3.sh", "8", "2", "2", 77, "logit_normal"),
    ("train_flux.sh", "4", "8", "1", 77, "none"),  # the authors' Flux trainer defaults (PROTOCOL.md §4)
])
def test_launch_scripts_pass_the_papers_settings(repo_root, tmp_path, script, per_device, processes, accumulation,
                                                 seq_len, weighting):
    result, args = _launch(repo_root, tmp_path, script)
    assert result.returncode == 0, result.stderr
    assert args[args.index("--config_file") + 1].endswith("ds_config.yaml")
    assert _flag(args, "--num_processes") == processes
    assert _flag(args, "--train_batch_size") == per_device
    assert _flag(args, "--gradient_accumulation_steps") == accumulation
    assert int(per_device) * int(processes) * int(accumulation) == 32
    trainer = TRAINERS[script]
    flags = trainer.parse_args(args[args.index(str(repo_root / trainer.__name__) + ".py") + 1:])  # what the run gets
    assert (flags.resolution, flags.learning_rate, flags.lr_scheduler, flags.max_train_steps,
            flags.checkpointing_steps, flags.gradient_checkpointing) == (4096, 1e-6, "constant", 20000, 5000, True)
    assert (flags.max_sequence_length, flags.weighting_scheme) == (seq_len, weighting)
    assert getattr(flags, "guidance_scale", None) == (3.5 if script == "train_flux.sh" else None)
    assert args[-2:] == ["--report_to", "none"]


def test_a_global_batch_that_does_not_divide_is_refused(repo_root, tmp_path):
    result, args = _launch(repo_root, tmp_path, "train_sd3.sh", NUM_PROCESSES="3")
    assert result.returncode != 0 and not args
    assert "global batch of 32" in result.stderr


def test_a_multi_node_launch_passes_the_machines_to_accelerate(repo_root, tmp_path):
    result, args = _launch(repo_root, tmp_path, "train_flux.sh", NUM_MACHINES="2", MACHINE_RANK="1",
                           MAIN_PROCESS_IP="10.0.0.1")
    assert result.returncode == 0, result.stderr
    assert [_flag(args, flag) for flag in ("--num_machines", "--machine_rank", "--main_process_ip",
                                           "--main_process_port", "--num_processes")] == ["2", "1", "10.0.0.1",
                                                                                          "29500", "8"]
    (tmp_path / "no-rank").mkdir()
    result, args = _launch(repo_root, tmp_path / "no-rank", "train_flux.sh", NUM_MACHINES="2",
                           MAIN_PROCESS_IP="10.0.0.1")
    assert result.returncode != 0 and not args and "MACHINE_RANK" in result.stderr


@pytest.mark.parametrize("script", ["train_sd3.sh", "train_flux.sh"])
def test_the_flags_are_checked_in_one_plain_process_before_the_launch(repo_root, tmp_path, script):
    result, args = _launch(repo_root, tmp_path, script, MIXED_PRECISION="no")
    assert result.returncode == 0, result.stderr
    trainer = str(repo_root / TRAINERS[script].__name__) + ".py"
    check = recorded(tmp_path, "python")
    assert check[0] == trainer and check[1:] == [*args[args.index(trainer) + 1:], "--check_only"]
    assert args[args.index("--mixed_precision") + 1] == "no" and args.index("--mixed_precision") < args.index(trainer)


def test_a_mistake_stops_the_launch_script_in_one_line_before_accelerate_starts(repo_root, tmp_path):
    env = {**recording_launch(tmp_path), "PYTHON": sys.executable, "MODEL_DIR": str(tmp_path / "nowhere")}
    result = subprocess.run(["bash", str(repo_root / "train_sd3.sh")], env=env, capture_output=True, text=True)
    assert result.returncode == 2 and not recorded(tmp_path, "accelerate")  # nothing launched
    assert "Traceback" not in result.stderr and "accelerate" not in result.stderr
    last = result.stderr.splitlines()[-1]  # (torch's import-time warnings may come before it)
    assert last.startswith(f"train_sd3.py: error: --pretrained_model_name_or_path {tmp_path / 'nowhere'}"), last
