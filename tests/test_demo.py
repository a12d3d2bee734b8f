"""The README's main command in small: demo.py runs every script end to end, then resumes instead of redoing."""
import json
import math
import subprocess
import sys

from PIL import Image


def test_demo_runs_end_to_end_and_resumes(repo_root, tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "demo.py", "--out", str(out), "--resolution", "128", "--train_steps", "2",
           "--height", "192", "--width", "256", "--steps", "2", "--eval_size", "64"]
    first = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    for model in ("sd3", "flux"):
        train = summary[f"train_{model}"]
        assert train["status"] == "completed" and train["steps"] == 2
        assert train["engine"]["distributed_type"] == "DEEPSPEED" and train["engine"]["offload_optimizer"] == "cpu"
        assert all(math.isfinite(loss) for loss in train["losses"])
        images = sorted((out / "generated" / model).glob("*.png"))
        assert len(images) == 2 and all(Image.open(p).size == (256, 192) for p in images)
        assert math.isfinite(summary[f"detail_{model}"]["glcm_score"])
    assert all(math.isfinite(summary["fid_sd3"][k]) for k in ("fid", "clip_score", "aesthetics", "compression_ratio"))
    assert Image.open(out / "summary.png").size[0] > 256
    assert "GLCM" in first.stdout or "glcm" in first.stdout.lower()

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.suffix in (".png", ".safetensors")
              and p.name != "summary.png"}
    again = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "train_sd3:" not in again.stdout and "generate_sd3:" not in again.stdout
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
