"""The check that compares the installed packages with requirements.lock (tests/conftest.py)."""
from importlib import metadata

import pytest

import conftest


def test_differences_name_each_package_and_both_versions(tmp_path):
    lock = tmp_path / "requirements.lock"
    lock.write_text(f"pytest=={metadata.version('pytest')}\n    # via -r requirements.txt\n"
                    "tqdm==0.0.1\n"
                    "not-a-real-package-d4k==1.0\n"
                    "Pillow==0.0.2 ; python_version < '3'\n"  # not for this Python: ignored
                    "--extra-index-url https://example.invalid/simple\n")
    assert conftest.lock_differences(lock) == [f"tqdm: {metadata.version('tqdm')} installed, 0.0.1 locked",
                                               "not-a-real-package-d4k: not installed, 1.0 locked"]


def test_the_repo_lock_pins_every_package_exactly():
    lines = [line.split("#")[0].strip() for line in conftest.LOCK_FILE.read_text().splitlines()]
    pins = [line for line in lines if line and not line.startswith("-")]
    assert len(pins) > 50 and all("==" in line for line in pins)
    assert {"torch", "diffusers", "deepspeed", "accelerate"} <= {line.split("==")[0] for line in pins}


class _Config:
    def __init__(self):
        self.stash = pytest.Stash()


def test_ci_fails_on_a_difference_and_a_researcher_gets_a_warning(monkeypatch):
    monkeypatch.setattr(conftest, "lock_differences", lambda: ["tqdm: 9.9 installed, 4.0 locked"])
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.UsageError, match=r"tqdm: 9\.9 installed, 4\.0 locked"):
        conftest.pytest_configure(_Config())
    monkeypatch.setenv("CI", "")
    config = _Config()
    conftest.pytest_configure(config)
    header = conftest.pytest_report_header(config)
    assert header[0].startswith("WARNING: 1 package differ") and "tqdm: 9.9 installed, 4.0 locked" in header[1]
