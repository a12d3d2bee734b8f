"""Shared fixtures: offline mode and the tiny SD3/Flux checkpoints, built once per test session."""
import os
from pathlib import Path

import pytest

# Nothing is ever downloaded: every test runs as a user without network would.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root():
    """The repository root (where the scripts live)."""
    return ROOT


@pytest.fixture(scope="session")
def tiny_ckpts(tmp_path_factory):
    """{"sd3": Path, "flux": Path}: tiny random-weight diffusers pipelines saved with save_pretrained."""
    from tiny_models import save_tiny_pipelines

    return save_tiny_pipelines(tmp_path_factory.mktemp("tiny"))
