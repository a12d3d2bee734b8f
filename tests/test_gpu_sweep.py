"""bench/gpu_sweep.py --tiny: the GPU sweep's code path on the CPU, its records, tables and skipped cases."""
import json
import subprocess
import sys

import pytest

from bench import gpu_sweep


def test_tiny_sweep_measures_every_cpu_mode_and_says_what_it_skipped(repo_root, tmp_path):
    done = subprocess.run([sys.executable, "-m", "bench.gpu_sweep", "--tiny", "--out", str(tmp_path),
                           "--skip", "compile"], cwd=repo_root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "gpu_sweep.json").read_text())
    records, skipped = summary["records"], {s["case"]: s["reason"] for s in summary["skipped"]}
    assert not [r for r in records if "error" in r], [r for r in records if "error" in r]

    generation = {(r["model"], r["mode"], r["size"]): r for r in records if r["bench"] == "generation"}
    cpu_modes = [m for m, s in gpu_sweep.MODES.items()
                 if s.get("cpu_offload") not in ("model", "sequential") and s.get("quantize") not in ("float8dq",)
                 and not s.get("compile")]
    for model in ("sd3", "flux"):
        for mode in cpu_modes:
            for height, width in gpu_sweep.TINY_SIZES:
                record = generation[model, mode, f"{height}x{width}"]
                assert record["s_per_step"] > 0 and record["steps_timed"] == 1
                plain = generation[model, "none", f"{height}x{width}"]["s_per_step"]
                if mode != "none":
                    assert record["ratio_vs_none_s"] == pytest.approx(record["s_per_step"] / plain, rel=2e-3)
        for mode in gpu_sweep.MODES:
            case = f"generation {model} {mode}"
            if mode not in cpu_modes:  # each mode the CPU cannot run is listed with the reason
                assert "CUDA" in skipped[case] or "--skip" in skipped[case], (case, skipped.get(case))
    decode = [r for r in records if r["bench"] == "decode"]
    assert {(r["vae"], r["mode"], r["tiling"]) for r in decode} == {
        ("F8", "stock", False), ("F8", "stock", True), ("F16", "partitioned", False), ("F16", "subpixel", False),
        ("F16", "full", False), ("F16", "partitioned", True)}
    assert all(r["fits"] and r["decode_s"] > 0 for r in decode)
    assert [r["device"] for r in records if r["bench"] == "glcm"] == ["cpu"]
    train = {r["case"]: r for r in records if r["bench"] == "train"}
    assert train["train sd3_full_zero2"]["optimizer"] == "DeepSpeedCPUAdam"  # ZeRO-2 with the optimizer offloaded
    assert train["train flux_lora"]["trainable_params_b"] < 1e-3 and "LoRA" in train["train flux_lora"]["engine"]
    assert all(r["images_per_second"] > 0 for r in train.values())

    table = (tmp_path / "gpu_sweep.md").read_text()
    assert "beside Table 5" in table and "## Skipped" in table
    assert table.count("| sd3 | int8wo |") == len(gpu_sweep.TINY_SIZES)
    assert all(f"- {case}:" in table for case in skipped)


def test_sweep_skips_what_does_not_fit_in_the_time_left(tmp_path):
    args = gpu_sweep.parse_args(["--tiny", "--out", str(tmp_path), "--budget_s", "-1",
                                                "--only", "glcm"])
    summary = gpu_sweep.main(args)
    assert not summary["records"]
    reasons = {s["case"]: s["reason"] for s in summary["skipped"]}
    assert "budget left" in reasons["glcm"]
    assert reasons["generation sd3 none"] == "not named by --only"


def test_a_failed_case_is_a_table_row_with_its_error():
    summary = {"device": "cpu", "command": "x", "date": "d", "torch": "t", "elapsed_s": 1, "budget_s": 2,
               "skipped": [], "records": [{"case": "decode F16 partitioned", "error": "OutOfMemoryError: 80 GiB"},
                                          {"case": "glcm", "error": "RuntimeError: boom"}]}
    table = gpu_sweep.markdown(summary)
    assert "| decode F16 partitioned | error: OutOfMemoryError: 80 GiB |" + "  |" * 5 in table
    assert "## GLCM Score, GPU against CPU" in table and "| glcm | error: RuntimeError: boom |" + "  |" * 3 in table
    assert "## Generation" not in table and "## Skipped" not in table
