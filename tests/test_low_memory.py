"""low_memory.py: each memory saving gives the plain run's image (or a stated tolerance), or a clear error on the
CPU."""
import json
import re

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline

import low_memory
from errors import UsageError
from partitioned_vae import use_f16_vae

PIPELINES = {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}
PROMPT = "a photo of a red castle"
LAYERWISE_SKIP = ("pos_embed", "patch_embed", "norm", "^proj_in$", "^proj_out$")  # diffusers' documented defaults
# (mean, max) bounds on |change| of pixels in [0, 1], 2.5x the largest measured over both tiny models (fp8: mean
# 0.0024, max 0.032; int8: mean 0.0007, max 0.018, tests/test_low_memory.py -s prints them): a dropped cast or a
# wider quantisation moves them past these.
FP8_INT8_IMAGE_CHANGE = {"fp8": (0.006, 0.08), "int8": (0.002, 0.045)}


def load(kind, ckpt, quantize="none", dtype=torch.float32):
    """The stock tiny pipeline with the F=16 VAE, optionally quantised by torchao as it loads."""
    pipe = PIPELINES[kind].from_pretrained(ckpt, torch_dtype=dtype,
                                           quantization_config=low_memory.quantization_config(quantize))
    pipe.set_progress_bar_config(disable=True)
    return use_f16_vae(pipe)


def image(pipe, size=64):
    """A size x size image of PROMPT in 2 steps, seed 0, as a float array in [0, 1]."""
    return pipe(PROMPT, height=size, width=size, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                output_type="np").images[0]


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_cpu_modes_give_the_plain_image(tiny_ckpts, kind):
    plain = image(load(kind, tiny_ckpts[kind]))
    # Group offloading only moves weights (here CPU -> CPU through the same hooks as on a GPU): the same numbers.
    group = low_memory.apply_low_memory(load(kind, tiny_ckpts[kind]), "cpu", cpu_offload="group")
    assert getattr(group.transformer, "_diffusers_hook", None) is not None
    np.testing.assert_array_equal(image(group), plain)
    # fp8 storage: every Linear layer but those diffusers' layerwise casting skips by name (its documented default
    # patterns plus the model class's own) holds fp8 weights; int8 weight-only (torchao): every Linear layer.
    fp8 = low_memory.apply_low_memory(load(kind, tiny_ckpts[kind]), "cpu", layerwise_casting="fp8_e4m3")
    skipped = LAYERWISE_SKIP + tuple(type(fp8.transformer)._skip_layerwise_casting_patterns or ())
    linears = {name: module for name, module in fp8.transformer.named_modules() if isinstance(module, torch.nn.Linear)}
    cast = {name for name in linears if not any(re.search(pattern, name) for pattern in skipped)}
    assert len(cast) >= 20 and len(linears) - len(cast) >= 4  # attention, MLP, embedders; adaLN and proj_out kept
    assert {name for name, m in linears.items() if m.weight.dtype == torch.float8_e4m3fn} == cast
    assert all(linears[name].weight.dtype == torch.float32 for name in set(linears) - cast)
    int8 = low_memory.apply_low_memory(load(kind, tiny_ckpts[kind], quantize="int8wo"), "cpu")
    weights = [type(m.weight).__name__ for m in int8.transformer.modules() if isinstance(m, torch.nn.Linear)]
    assert len(weights) == len(linears) and set(weights) == {"Int8Tensor"}
    # fp8 e4m3 keeps 3 mantissa bits (relative rounding up to 2^-4 per weight), int8 255 levels per row: the image
    # moves by under one 1/255 step on average (FP8_INT8_IMAGE_CHANGE), and must move.
    for name, pipe in (("fp8", fp8), ("int8", int8)):
        difference = np.abs(image(pipe) - plain)
        mean_bound, max_bound = FP8_INT8_IMAGE_CHANGE[name]
        print(f"{kind} {name}: mean {difference.mean():.5f}, max {difference.max():.4f}")
        assert 0 < difference.mean() < mean_bound and difference.max() < max_bound, (name, difference.mean(),
                                                                                       difference.max())


def test_vae_tiling_decodes_f16_tiles(tiny_ckpts):
    pipe = load("sd3", tiny_ckpts["sd3"])
    vae = pipe.vae
    latents = torch.randn(1, 16, 32, 32, generator=torch.Generator().manual_seed(0))  # 512x512 pixels, F=16
    with torch.no_grad():
        plain = vae.decode(latents).sample
        small = vae.decode(latents[:, :, :8, :8]).sample
        low_memory.apply_low_memory(pipe, "cpu", vae_tiling=True)
        assert vae.use_tiling and vae.tile_latent_min_size * 16 == vae.tile_sample_min_size == 256
        tiled = vae.decode(latents).sample
        torch.testing.assert_close(vae.decode(latents[:, :, :8, :8]).sample, small)  # below one tile: no tiling
        first_tile = vae.decoder(latents[:, :, :16, :16])  # a 16x16 latent tile decodes to 256x256 pixels
    assert tiled.shape == plain.shape == (1, 3, 512, 512)
    keep = vae.tile_sample_min_size - int(vae.tile_sample_min_size * vae.tile_overlap_factor)
    torch.testing.assert_close(tiled[..., :keep, :keep], first_tile[..., :keep, :keep])
    # Elsewhere tiles overlap by a quarter and are blended linearly: the seams differ from the one-pass decode,
    # which sees the whole latent (on random weights by up to a large part of the range, on average a little).
    assert (tiled - plain).abs().mean() < 0.15


def test_what_needs_a_gpu_or_contradicts_fails_naming_the_flag():
    with pytest.raises(UsageError, match="--quantize float8dq needs a CUDA GPU"):
        low_memory.check_low_memory("cpu", quantize="float8dq")
    with pytest.raises(UsageError, match="--quantize float8wo needs a CUDA GPU"):
        low_memory.check_low_memory("cpu", quantize="float8wo")
    with pytest.raises(UsageError, match="--quantize and --layerwise_casting"):
        low_memory.check_low_memory("cpu", quantize="int8wo", layerwise_casting="fp8_e4m3")
    with pytest.raises(UsageError, match="--compile .*--cpu_offload sequential"):
        low_memory.check_low_memory("cpu", cpu_offload="sequential", compile=True)
    with pytest.raises(UsageError, match="--cpu_offload 'disk'"):
        low_memory.check_low_memory("cpu", cpu_offload="disk")
    low_memory.check_low_memory("cpu", "group", "fp8_e4m3", "none", True)  # fine on the CPU
    low_memory.check_low_memory("cpu", quantize="int8wo")
    assert low_memory.quantization_config("none") is None


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_compiled_transformer_gives_the_plain_image(tiny_ckpts, kind):
    # inductor's fused kernels reorder float sums: equal to float32 rounding, not bit for bit (about 2 min cold).
    plain = image(load(kind, tiny_ckpts[kind]))
    compiled = low_memory.apply_low_memory(load(kind, tiny_ckpts[kind]), "cpu", compile=True)
    np.testing.assert_allclose(image(compiled), plain, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# The generating scripts: --lora_path / --lora_scale and the low-memory flags, recorded with every image
# ---------------------------------------------------------------------------------------------------------

from test_generation import pixels, run  # noqa: E402  (the generation CLIs' test helpers)
from test_lora import trained_adapter  # noqa: E402

from errors import exit_on_usage_error  # noqa: E402
from generation import main, parse_args, read_image_settings  # noqa: E402


def test_generation_cli_fuses_the_adapter_at_its_scale_and_records_every_setting(tiny_ckpts, tmp_path):
    adapter = trained_adapter("sd3", tiny_ckpts["sd3"], tmp_path / "adapter")
    (plain,) = run("sd3", tiny_ckpts["sd3"], tmp_path / "plain", "--height", "64", "--width", "64")
    (zero,) = run("sd3", tiny_ckpts["sd3"], tmp_path / "zero", "--height", "64", "--width", "64",
                  "--lora_path", str(adapter.parent), "--lora_scale", "0")
    (full,) = run("sd3", tiny_ckpts["sd3"], tmp_path / "full", "--height", "64", "--width", "64",
                  "--lora_path", str(adapter), "--quantize", "int8wo", "--vae_tiling")
    np.testing.assert_array_equal(pixels(zero), pixels(plain))  # W + 0 * B A is W
    assert np.abs(pixels(full) - pixels(plain)).mean() > 1
    settings = read_image_settings(full)
    assert settings["lora_path"] == str(adapter.resolve()) and settings["lora_scale"] == 1.0
    assert len(settings["lora_sha256"]) == 64 and read_image_settings(zero)["lora_scale"] == 0.0
    assert {k: settings[k] for k in ("cpu_offload", "layerwise_casting", "quantize", "vae_tiling", "compile")} == {
        "cpu_offload": "none", "layerwise_casting": "none", "quantize": "int8wo", "vae_tiling": True, "compile": False}
    assert read_image_settings(plain)["lora_path"] is None


def test_generation_cli_refuses_a_gpu_only_mode_or_a_foreign_adapter_before_generating(tiny_ckpts, tmp_path,
                                                                                        capsys):
    adapter = trained_adapter("flux", tiny_ckpts["flux"], tmp_path / "flux-adapter")
    base = ["--checkpoint_path", str(tiny_ckpts["sd3"]), "--prompt", "a cat", "--device", "cpu", "--dtype", "fp32",
            "--height", "64", "--width", "64", "--num_inference_steps", "1", "--save_path", str(tmp_path / "out")]
    for flags, message in ((["--quantize", "float8dq"], "--quantize float8dq needs a CUDA GPU"),
                           (["--lora_path", str(adapter)], "does not fit this SD3Transformer2DModel"),
                           (["--lora_path", str(tmp_path)], "holds no pytorch_lora_weights.safetensors")):
        with pytest.raises(SystemExit) as exit_info:
            exit_on_usage_error("test_sd3.py", main, parse_args("sd3", base + flags))
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not list((tmp_path / "out").glob("*.png")) if (tmp_path / "out").exists() else True


def test_eval_folder_refuses_images_of_another_adapter_or_quantisation(tiny_ckpts, tmp_path):
    import generate_and_eval_fid as fid

    adapter = trained_adapter("sd3", tiny_ckpts["sd3"], tmp_path / "adapter")

    def settings(*flags):
        args = fid.parse_args(["--checkpoint_path", str(tiny_ckpts["sd3"]), "--model", "sd3", "--json_file", "x",
                              "--save_path", str(tmp_path / "eval"), *flags])
        return fid.generation_settings(args)

    first = settings("--lora_path", str(adapter), "--cpu_offload", "model")
    assert first == settings("--lora_path", str(adapter.parent))  # the folder names the same file; offload: same pixels
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / fid.SETTINGS_FILE).write_text(json.dumps(first))
    for flags, changed in ((["--lora_scale", "0.5", "--lora_path", str(adapter)], "lora_scale: 1.0 -> 0.5"),
                           ([], "lora_path"), (["--lora_path", str(adapter), "--quantize", "int8wo"], "quantize")):
        with pytest.raises(UsageError, match=changed):
            fid.check_generation_settings(tmp_path / "eval", settings(*flags))
