"""The generation CLIs (test_sd3.py, test_flux.py), their core generation.py, and bench/flops.py."""
import copy
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from bench.flops import flux_transformer_flops, sd3_transformer_flops
from errors import UsageError, exit_on_usage_error
from generation import (build_parser, check_resolution, load_pipeline, main, output_stem, parse_args,
                        read_image_settings, read_prompts, resolve_device, resolve_dtype, save_image, sidecar_path)
from models import MODELS
from partitioned_vae import make_f16_vae

PROMPT = "a photo of a red castle under clouds, highly detailed"
KINDS = ["sd3", "flux"]


def run(kind, ckpt, out, *flags):
    """main() of test_<kind>.py with the tiny checkpoint, 2 steps, fp32 on the CPU; returns the saved paths."""
    argv = ["--checkpoint_path", str(ckpt), "--prompt", PROMPT, "--num_inference_steps", "2", "--device", "cpu",
            "--dtype", "fp32", "--save_path", str(out), *flags]
    return main(build_parser(kind).parse_args(argv))


def pixels(path):
    """The image at `path` as an int array (H, W, 3)."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(np.int64)


# ---------------------------------------------------------------------------------------------------------
# Generating
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_exact_sizes_seeds_settings_and_overwrite(tiny_ckpts, tmp_path, kind):
    wide = run(kind, tiny_ckpts[kind], tmp_path, "--height", "384", "--width", "512", "--num_images", "2")
    assert Image.open(wide[0]).size == (512, 384)  # (width, height); the 384x512 case runs as a script below
    first = pixels(wide[0])
    assert np.abs(first - pixels(wide[1])).mean() > 1, "seeds 0 and 1 gave the same image"

    # The same seed again: refused without --overwrite (nothing touched), identical pixels with it.
    before = wide[0].read_bytes()
    with pytest.raises(UsageError, match="--overwrite"):
        run(kind, tiny_ckpts[kind], tmp_path, "--height", "384", "--width", "512")
    assert wide[0].read_bytes() == before
    again = run(kind, tiny_ckpts[kind], tmp_path, "--height", "384", "--width", "512", "--overwrite")
    assert again == wide[:1]
    np.testing.assert_array_equal(pixels(again[0]), first)

    # Every setting is in the sidecar, and the same settings are embedded in the image.
    sidecar = json.loads(sidecar_path(wide[1]).read_text())
    expected = {"model": kind, "prompt": PROMPT, "seed": 1, "height": 384, "width": 512, "num_inference_steps": 2,
                "guidance_scale": MODELS[kind].inference.guidance_scale, "vae": "F16", "vae_mode": "partitioned",
                "dtype": "fp32", "max_sequence_length": MODELS[kind].inference.max_sequence_length}
    assert expected.items() <= sidecar.items()
    assert len(sidecar["timings"]["step_s"]) == 2
    assert read_image_settings(wide[1]) == {k: v for k, v in sidecar.items() if k not in ("image", "timings")}
    name = wide[1].name
    assert name.startswith(f"{kind}_a-photo-of-a-red-castle") and name.endswith(".png")
    assert f"h384-w512_g{MODELS[kind].inference.guidance_scale:g}_seed1" in name


def test_vae_modes_give_the_same_image(tiny_ckpts, tmp_path):
    images = {}
    for mode in ("partitioned", "subpixel", "full"):
        (path,) = run("sd3", tiny_ckpts["sd3"], tmp_path / mode, "--height", "256", "--width", "320",
                      "--vae_mode", mode, "--grid", "3")
        assert read_image_settings(path)["vae_mode"] == mode
        images[mode] = pixels(path)
    assert np.abs(images["partitioned"] - images["full"]).max() <= 1
    assert np.abs(images["subpixel"] - images["full"]).max() <= 1


@pytest.mark.parametrize("kind", KINDS)
def test_pipeline_gets_the_f16_vae_unless_vae_mode_f8(tiny_ckpts, kind):
    f16 = load_pipeline(kind, tiny_ckpts[kind], dtype="fp32", device="cpu")
    f8 = load_pipeline(kind, tiny_ckpts[kind], dtype="fp32", device="cpu", vae_mode="f8")
    assert (f16.vae_scale_factor, f8.vae_scale_factor) == (16, 8)
    packing = 2 if kind == "flux" else 1  # Flux packs 2x2 latents: its image processor works in steps of 32
    assert f16.image_processor.config.vae_scale_factor == 16 * packing
    assert f16.vae.encoder.conv_in.stride == (2, 2) and f8.vae.encoder.conv_in.stride == (1, 1)
    if kind == "sd3":  # tiny SD3: 96x96 positional patches = 1536 px with F=8, 3072 px with F=16
        check_resolution(f16, 3072, 2048)
        with pytest.raises(UsageError, match="Use an F=16 --vae_mode"):
            check_resolution(f8, 2048, 1536)


def test_a_separate_vae_folder_replaces_the_checkpoints_in_the_authors_mode(tiny_ckpts, tmp_path):
    stock = load_pipeline("flux", tiny_ckpts["flux"], dtype="fp32", device="cpu", vae_mode="f8").vae
    sc_vae = make_f16_vae(copy.deepcopy(stock), "authors")  # as train_sc_vae.py saves it: a changed decoder
    with torch.no_grad():
        sc_vae.decoder.conv_out.weight.mul_(0.5)
    sc_vae.save_pretrained(tmp_path / "sc-vae" / "vae")
    pipe = load_pipeline("flux", tiny_ckpts["flux"], vae_mode="authors", dtype="fp32", device="cpu",
                         vae_path=tmp_path / "sc-vae")
    assert pipe.vae.decoder.conv_out.mode == "authors" and pipe.vae_scale_factor == 16
    assert torch.equal(pipe.vae.decoder.conv_out.weight, sc_vae.decoder.conv_out.weight)
    with pytest.raises(UsageError, match="--pretrained_vae_model_name_or_path: .*does not exist"):
        load_pipeline("flux", tiny_ckpts["flux"], dtype="fp32", device="cpu", vae_path=tmp_path / "none")
    with pytest.raises(UsageError, match="Unknown --vae_mode 'f16'"):
        load_pipeline("flux", tiny_ckpts["flux"], vae_mode="f16", dtype="fp32", device="cpu")


def test_both_clis_run_as_scripts(tiny_ckpts, tmp_path, repo_root):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = {}
    for kind in KINDS:
        cmd = [sys.executable, f"test_{kind}.py", "--checkpoint_path", str(tiny_ckpts[kind]), "--prompt", PROMPT,
               "--height", "512", "--width", "384", "--num_inference_steps", "2", "--device", "cpu",
               "--save_path", str(tmp_path / kind), "--save_format", "jpg"]
        procs[kind] = subprocess.Popen(cmd, cwd=repo_root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True)
    for kind, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        assert "s/step" in out and "| 2/2 [" in err  # timings, and diffusers' progress bar over the 2 steps
        (image,) = (tmp_path / kind).glob("*.jpg")
        assert Image.open(image).size == (384, 512)
        assert read_image_settings(image)["dtype"] == "bf16" and json.loads(sidecar_path(image).read_text())["model"] == kind


# ---------------------------------------------------------------------------------------------------------
# User errors
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_size_not_a_multiple_of_32_names_the_nearest_sizes(tiny_ckpts, tmp_path, kind, capsys):
    with pytest.raises(UsageError, match="480 or 512"):
        run(kind, tiny_ckpts[kind], tmp_path, "--height", "500")
    with pytest.raises(SystemExit) as exit_info:  # the CLI: one line on stderr, exit status 2, no traceback
        exit_on_usage_error(f"test_{kind}.py", main, parse_args(kind, ["--checkpoint_path", str(tiny_ckpts[kind]),
                                                                     "--width", "500", "--save_path", str(tmp_path)]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "width 500" in err and "480 or 512" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def _remove(relative):
    """A breakage: delete one file or folder of the checkpoint."""
    def breakage(root):
        target = root / relative
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    return breakage


def _missing_shard(root):
    """A breakage: the transformer's weights become a sharded index whose shard is absent."""
    folder = root / "transformer"
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    index = {"weight_map": {"proj_out.weight": "diffusion_pytorch_model-00001-of-00002.safetensors"}}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("breakage, named", [
    (_remove("text_encoder_3/model.safetensors"), "text_encoder_3"),
    (_remove("tokenizer_2"), "tokenizer_2"),
    (_remove("vae/config.json"), "vae/config.json"),
    (_remove("scheduler/scheduler_config.json"), "scheduler_config.json"),
    (_remove("model_index.json"), "model_index.json"),
    (_missing_shard, "diffusion_pytorch_model-00001-of-00002.safetensors"),
])
def test_incomplete_checkpoint_names_the_missing_file(tiny_ckpts, tmp_path, breakage, named):
    root = tmp_path / "sd3"
    shutil.copytree(tiny_ckpts["sd3"], root)
    breakage(root)
    with pytest.raises(UsageError, match="stable-diffusion-3-medium-diffusers") as error:
        load_pipeline("sd3", root, dtype="fp32", device="cpu")
    assert named in str(error.value)


def test_wrong_or_absent_checkpoint_says_what_to_do(tiny_ckpts, tmp_path):
    with pytest.raises(UsageError, match="does not exist.*hf download black-forest-labs/FLUX.1-dev"):
        run("flux", tmp_path / "nowhere", tmp_path)
    with pytest.raises(UsageError, match="StableDiffusion3Pipeline checkpoint.*Use test_sd3.py"):
        run("flux", tiny_ckpts["sd3"], tmp_path)


def test_prompt_and_dtype_errors(tmp_path):
    blank = tmp_path / "blank.txt"
    blank.write_text("\n   \n")
    with pytest.raises(UsageError, match="holds no prompt"):
        read_prompts(prompt_file=blank)
    with pytest.raises(UsageError, match="--prompt is empty"):
        read_prompts(prompt="  ")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\n a dog \n")
    assert read_prompts(prompt_file=prompts) == ["a cat", "a dog"]
    assert len(read_prompts()) >= 3  # the built-in showcase prompts
    with pytest.raises(UsageError, match="bf16 or --dtype fp32"):
        resolve_dtype("fp16", torch.device("cpu"))
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback when CUDA is absent")
def test_cuda_request_falls_back_to_cpu_with_a_warning():
    with pytest.warns(UserWarning, match="CUDA is not available"):
        assert resolve_device("cuda").type == "cpu"


# ---------------------------------------------------------------------------------------------------------
# Names and metadata
# ---------------------------------------------------------------------------------------------------------

def test_names_say_what_made_the_image_and_never_collide():
    a = output_stem("flux", "Crème brûlée on a plate, " + "x" * 60 + " morning", 4096, 3072, 5.0, 7)
    b = output_stem("flux", "Crème brûlée on a plate, " + "x" * 60 + " evening", 4096, 3072, 5.0, 7)
    assert a.startswith("flux_creme-brulee-on-a-plate") and a.endswith("_h4096-w3072_g5_seed7")
    assert a != b and all(c.isalnum() or c in "-_." for c in a)
    assert output_stem("sd3", "x", 1024, 1024, 7.0, 0, vae_mode="f8").startswith("sd3-f8_")
    assert output_stem("sd3", "x", 1024, 1024, 7.0, 0, vae_mode="authors").startswith("sd3-authors_")
    assert output_stem("sd3", "x", 1024, 1024, 7.0, 0, vae_mode="subpixel") == output_stem("sd3", "x", 1024, 1024,
                                                                                            7.0, 0)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_save_image_embeds_metadata_and_refuses_to_overwrite(tmp_path, suffix):
    path = tmp_path / f"image{suffix}"
    metadata = {"prompt": "ein Bild über Wolken", "seed": 3, "guidance_scale": 7.0}
    save_image(Image.new("RGB", (64, 32), (200, 10, 10)), path, metadata, extra={"timings": {"total_s": 1.0}})
    with Image.open(path) as image:
        raw = image.text["settings"] if suffix == ".png" else image.info["comment"].decode("utf-8")
        assert image.size == (64, 32)
    assert json.loads(raw) == metadata == read_image_settings(path)
    assert json.loads(sidecar_path(path).read_text()) == {"image": path.name, **metadata, "timings": {"total_s": 1.0}}
    with pytest.raises(FileExistsError, match="--overwrite"):
        save_image(Image.new("RGB", (8, 8)), path, metadata)
    save_image(Image.new("RGB", (8, 8)), path, metadata, overwrite=True)
    assert Image.open(path).size == (8, 8)


# ---------------------------------------------------------------------------------------------------------
# Analytic FLOPs against torch's FLOP counter
# ---------------------------------------------------------------------------------------------------------

class MatmulShapes(TorchDispatchMode):
    """Records the operand shapes of every matrix product and attention call the ATen dispatcher runs.

    Our convention, independent of any torch release's FlopCounterMode: one multiply-add is 2 FLOPs;
    mm/addmm (m x k)(k x n) = 2mkn, bmm/baddbmm the same per batch, a convolution 2 x output elements x
    (input channels / groups) x kernel size, a fused scaled-dot-product attention 2·b·h·q·k·(d + d_v) (Q·Kᵀ and P·V).
    Any other op whose name says matmul, conv or attention is recorded as unhandled, so a new kernel shows up as a
    failure naming it instead of being silently left out.
    """

    PRODUCTS = {"mm", "addmm", "bmm", "baddbmm", "_addmm_activation"}

    def __init__(self):
        super().__init__()
        self.flops, self.unhandled = 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if name in self.PRODUCTS:
            a, b = (args[0], args[1]) if name in ("mm", "bmm") else (args[1], args[2])
            self.flops += 2 * a.numel() * b.shape[-1]
        elif name == "convolution":
            out = func(*args, **(kwargs or {}))
            weight = args[1]
            self.flops += 2 * out.numel() * weight[0].numel()
            return out
        elif "scaled_dot_product" in name:
            q, k, v = args[:3]
            self.flops += 2 * q.shape[:-1].numel() * k.shape[-2] * (q.shape[-1] + v.shape[-1])
        elif any(word in name for word in ("matmul", "conv", "attention", "einsum", "mm")):
            self.unhandled.add(name)
        return func(*args, **(kwargs or {}))


def counted_flops(model, **inputs):
    """FLOPs of one forward, counted from the shapes of the products the model actually runs (MatmulShapes)."""
    with torch.no_grad(), MatmulShapes() as counter:
        model(**inputs, return_dict=False)
    assert not counter.unhandled, f"ops the counter does not know: {sorted(counter.unhandled)}"
    return counter.flops


def test_matmul_shapes_counts_by_its_convention():
    """The reference counter itself, on products whose FLOPs are known by hand."""
    with torch.no_grad(), MatmulShapes() as counter:
        torch.nn.functional.linear(torch.randn(2, 5, 3), torch.randn(4, 3))  # 10 vectors 3 -> 4
        torch.randn(6, 2, 3) @ torch.randn(6, 3, 7)  # bmm
        torch.nn.functional.conv2d(torch.randn(1, 3, 8, 8), torch.randn(5, 3, 3, 3), padding=1)
        q, k, v = torch.randn(2, 4, 9, 8), torch.randn(2, 4, 11, 8), torch.randn(2, 4, 11, 8)
        torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert counter.flops == 2 * 10 * 3 * 4 + 2 * 6 * 2 * 3 * 7 + 2 * (5 * 8 * 8) * 27 + 2 * 2 * 4 * 9 * 11 * 16
    assert not counter.unhandled


@pytest.mark.parametrize("dual_attention_layers", [(), (0,)])
def test_sd3_flops_equal_the_products_the_model_runs(dual_attention_layers):
    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=8,
                                  num_attention_heads=4, joint_attention_dim=48, caption_projection_dim=32,
                                  pooled_projection_dim=40, out_channels=16, pos_embed_max_size=32,
                                  dual_attention_layers=dual_attention_layers)
    batch, height, width, text = 2, 16, 12, 7
    counted = counted_flops(model, hidden_states=torch.randn(batch, 16, height, width),
                            timestep=torch.full((batch,), 500.0), encoder_hidden_states=torch.randn(batch, text, 48),
                            pooled_projections=torch.randn(batch, 40))
    analytic = sd3_transformer_flops(model.config, (height // 2) * (width // 2), text, batch=batch)
    assert analytic == counted


@pytest.mark.parametrize("guidance_embeds", [True, False])
def test_flux_flops_equal_the_products_the_model_runs(guidance_embeds):
    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=3,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,
                                   pooled_projection_dim=32, guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6))
    batch, image, text = 2, 48, 9
    inputs = dict(hidden_states=torch.randn(batch, image, 64), encoder_hidden_states=torch.randn(batch, text, 48),
                  pooled_projections=torch.randn(batch, 32), timestep=torch.full((batch,), 0.5),
                  img_ids=torch.zeros(image, 3), txt_ids=torch.zeros(text, 3))
    if guidance_embeds:
        inputs["guidance"] = torch.full((batch,), 3.5)
    analytic = flux_transformer_flops(model.config, image, text, batch=batch)
    assert analytic == counted_flops(model, **inputs)


@pytest.mark.slow
def test_bench_smoke_prints_every_field(repo_root):
    result = subprocess.run([sys.executable, "-m", "bench.bench_generation", "--smoke"], cwd=repo_root,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    steps = [r for r in records if r["bench"] == "generation"]
    assert {r["model"] for r in steps} == {"sd3", "flux"}
    assert all(r["s_per_step"] > 0 and r["step_tflop"] > 0 for r in steps)
