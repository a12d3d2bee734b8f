"""Shared fixtures: offline mode and the tiny SD3/Flux checkpoints, built once per test session.

Before anything runs, the installed packages are compared with requirements.lock (the tested versions): a
difference is reported at the top of the output, and under CI (CI=true) it stops the run.
"""
import json
import os
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# Nothing is ever downloaded: every test runs as a user without network would.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
LOCK_FILE = ROOT / "requirements.lock"
LOCK_KEY = pytest.StashKey[list]()  # the differences, computed once


def lock_differences(lock_file=LOCK_FILE):
    """['torch: 2.15.0 installed, 2.14.1 locked', ...]: each locked package whose installed version differs."""
    differences = []
    for line in lock_file.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        locked = next(iter(requirement.specifier)).version
        try:
            installed = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            installed = None
        if installed != locked:
            differences.append(f"{canonicalize_name(requirement.name)}: "
                               f"{installed + ' installed' if installed else 'not installed'}, {locked} locked")
    return differences


def under_ci():
    """True when the CI variable says so (CI=true, as CI services set it)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def pytest_configure(config):
    """Under CI, an environment that differs from requirements.lock fails the run before any test."""
    differences = lock_differences()
    config.stash[LOCK_KEY] = differences
    if differences and under_ci():
        raise pytest.UsageError(f"CI=true and the environment differs from {LOCK_FILE.name} "
                                f"({len(differences)} differ): " + "; ".join(differences)
                                + ". Install with: .venv/bin/pip install -r requirements.lock")


def pytest_report_header(config):
    """The first lines of the output: the tested versions, or each package that differs from them."""
    differences = config.stash[LOCK_KEY]
    if not differences:
        return f"environment: every package at its {LOCK_FILE.name} version (the tested versions)"
    count = f"{len(differences)} package{'s' if len(differences) > 1 else ''}"
    return ([f"WARNING: {count} differ from {LOCK_FILE.name} (the tested versions); "
             f"results may differ from CI:"] + [f"  {line}" for line in differences])



@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`): the
    machine's two cores are shared, and on a busy machine a second thread makes the Inception several times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def torchmetrics_lpips():
    """A function (backbone file, heads file) -> torchmetrics' own LPIPS network (AlexNet), the heads read from the
    heads file and the backbone's layers copied from a torchvision AlexNet that loads the backbone file: the
    independent reference for reconstruction.load_lpips and the SC-VAE's LPIPS term."""
    import torch
    from torchmetrics.functional.image.lpips import _LPIPS
    from torchvision.models import alexnet

    def build(backbone, heads):
        reference = _LPIPS(pretrained=True, net="alex", pnet_rand=True, model_path=str(heads)).eval()
        net = alexnet(weights=None)
        net.features.load_state_dict({k[len("features."):]: v for k, v in torch.load(backbone).items()})
        for block in reference.net.children():
            for index, layer in block.named_children():
                layer.load_state_dict(net.features[int(index)].state_dict())
        return reference

    return build


@pytest.fixture(scope="session")
def repo_root():
    """The repository root (where the scripts live)."""
    return ROOT


def recording_launch(folder):
    """An environment in which a launch script's `accelerate` and its flag check (`$PYTHON`) only record their
    arguments, one a line, in FOLDER/accelerate.txt and FOLDER/python.txt (what they were given)."""
    bin_dir = Path(folder) / "bin"
    bin_dir.mkdir(parents=True)
    for tool in ("accelerate", "python"):
        fake = bin_dir / tool
        fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{Path(folder) / tool}.txt"\n')
        fake.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": str(bin_dir / "python")}


def recorded(folder, tool):
    """The arguments a recording_launch tool was given ([] when it was not run)."""
    path = Path(folder) / f"{tool}.txt"
    return path.read_text().splitlines() if path.exists() else []


@pytest.fixture(scope="session")
def tiny_ckpts(tmp_path_factory):
    """{"sd3": Path, "flux": Path}: tiny random-weight diffusers pipelines saved with save_pretrained."""
    from tiny_models import save_tiny_pipelines

    return save_tiny_pipelines(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def real_width_flux(tmp_path_factory):
    """A folder holding transformer/: FLUX.1-dev's transformer at its real widths, one block of each kind, random
    weights, bf16, sharded as save_pretrained writes it (tiny_models.save_real_width_transformers)."""
    from tiny_models import save_real_width_transformers

    return save_real_width_transformers(tmp_path_factory.mktemp("real-width"), kinds=("flux",))["flux"]


QUICK_MINIATURE = {"size": 128, "vae_steps": 570, "transformer_steps": 450, "seed": 0}  # the demo's VAE, a shorter DiT


@pytest.fixture(scope="session")
def quick_miniatures(tmp_path_factory):
    """{"sd3": Path, "flux": Path}: the pretrained miniatures at QUICK_MINIATURE settings, built once per session
    (SD3: the demo's own VAE under a transformer trained 450 steps; Flux: 450 steps on the same VAE's latents)."""
    import miniature

    # MINIATURE_CACHE=DIR keeps the build between sessions (a developer's loop); CI builds it afresh.
    root = Path(os.environ["MINIATURE_CACHE"]) if os.environ.get("MINIATURE_CACHE") else tmp_path_factory.mktemp("mini")
    sd3 = miniature.build_miniature(root / "miniature-sd3", **QUICK_MINIATURE)
    flux = miniature.build_flux_miniature(root / "miniature-flux", sd3, QUICK_MINIATURE["transformer_steps"],
                                          QUICK_MINIATURE["seed"])
    return {"sd3": sd3, "flux": flux}


@pytest.fixture(scope="session")
def photo_folder(tmp_path_factory):
    """The miniature's eight photos at 128 x 128 as a training imagefolder (demo.make_image_folder)."""
    from demo import make_image_folder

    folder = tmp_path_factory.mktemp("photos") / "photos"
    make_image_folder(folder, QUICK_MINIATURE["size"])
    return folder


def train_in_process(kind, checkpoint, data_dir, output_dir, *flags, cache=None, resolution=128, batch_size=2,
                     tokens=32, steps=2, checkpointing_steps=1000):
    """One run of train_<kind>.py in this process (plain accelerate, fp32, CPU), started as a fresh process would
    start it; returns its train_summary.json."""
    from accelerate.state import AcceleratorState

    import train_flux
    import train_sd3

    trainer = {"sd3": train_sd3, "flux": train_flux}[kind]
    args = ["--pretrained_model_name_or_path", str(checkpoint), "--instance_data_dir", str(data_dir),
            "--output_dir", str(output_dir), "--resolution", str(resolution), "--train_batch_size", str(batch_size),
            "--max_sequence_length", str(tokens), "--mixed_precision", "no", "--report_to", "none",
            "--max_train_steps", str(steps), "--checkpointing_steps", str(checkpointing_steps), *flags]
    if cache:
        args += ["--data_cache_dir", str(cache)]
    AcceleratorState._reset_state(reset_partial_state=True)
    trainer.main(trainer.parse_args(args))
    return json.loads((Path(output_dir) / "train_summary.json").read_text())


def train_sc_vae_in_process(model_dir, data_dir, output_dir, *flags):
    """One in-process train_sc_vae.py run at 32x32, batch 1, generator steps only (no LPIPS), a checkpoint a step."""
    from accelerate.state import AcceleratorState

    import train_sc_vae

    argv = ["--pretrained_model_name_or_path", str(model_dir), "--train_data_dir", str(data_dir), "--output_dir",
            str(output_dir), "--resolution", "32", "--train_batch_size", "1", "--gradient_accumulation_steps", "1",
            "--lpips_scale", "0", "--gen_scale", "0", "--report_to", "none", "--checkpointing_steps", "1", *flags]
    AcceleratorState._reset_state(reset_partial_state=True)
    return train_sc_vae.main(train_sc_vae.parse_args(argv))
