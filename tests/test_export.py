"""export.py's transformer formats, each read back by a loader this project did not write: diffusers' single-file
loader (original layout, GGUF through GGUFQuantizationConfig), safetensors; and every file's keys and row slices
against ComfyUI's key maps, written out in tests/comfyui_keys.py with their source."""
import json
import subprocess
import sys

import gguf
import pytest
import torch
from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig, SD3Transformer2DModel
from safetensors.torch import load_file

import export
import lora
from adapter_helpers import diffusers_fused, random_adapter
from comfyui_keys import comfy_map, diffusers_tensor_of
from errors import UsageError

GGUF_Q8_BOUND = 0.02  # relative L2 error of a Q8_0 model's output (measured: 0.004 tiny SD3, 0.011 real-width Flux)


def run_export(*argv):
    return export.main(export.parse_args([str(a) for a in argv]))


def assert_same_tensors(loaded, reference):
    assert loaded.keys() == reference.keys()
    different = [k for k in reference if loaded[k].dtype != reference[k].dtype or not torch.equal(loaded[k], reference[k])]
    assert not different, different[:5]


def assert_comfyui_layout(kind, exported, reference):
    """The file holds exactly the original keys ComfyUI's map gives this model, and each diffusers tensor sits at
    the rows (and in the half order) the map says."""
    mapping = comfy_map(kind, reference)
    assert set(exported) == {mapping[k][0] for k in reference}
    for key, value in reference.items():
        stored = diffusers_tensor_of(exported[mapping[key][0]], mapping[key])
        assert stored.dtype == value.dtype and torch.equal(stored, value), key


@pytest.fixture(scope="module")
def sd35_like(tmp_path_factory):
    """A tiny SD3.5-medium-like transformer (q/k RMS norms with random scales, a second attention in block 0)."""
    torch.manual_seed(3)
    model = SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8,
                                  num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32,
                                  pooled_projection_dim=64, out_channels=16, pos_embed_max_size=96,
                                  qk_norm="rms_norm", dual_attention_layers=(0,))
    for name, param in model.named_parameters():
        if "norm" in name and param.dim() == 1:
            param.data = 1 + 0.1 * torch.randn(param.shape)
    folder = tmp_path_factory.mktemp("sd35")
    model.save_pretrained(folder / "transformer")
    return folder


#################################################################################
#                     The original layout, through diffusers' loader            #
#################################################################################

@pytest.mark.parametrize("variant", ["sd3-medium", "sd3.5"])
def test_sd3_original_export_loads_bit_identical_with_diffusers_single_file_in_comfyuis_layout(
        tiny_ckpts, sd35_like, tmp_path, variant):
    folder = tiny_ckpts["sd3"] if variant == "sd3-medium" else sd35_like
    out = tmp_path / "sd3.safetensors"
    run_export("--checkpoint_path", folder, "--format", "original", "--out", out)
    reference = SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer").state_dict()
    loaded = SD3Transformer2DModel.from_single_file(str(out), config=str(folder), subfolder="transformer")
    assert_same_tensors(loaded.state_dict(), reference)
    assert_comfyui_layout("sd3", load_file(out), reference)  # only original keys: diffusers' loader alone would
    # also pass a file that kept diffusers' keys


def test_flux_original_export_of_the_real_width_model_loads_bit_identical_with_diffusers_single_file(
        real_width_flux, tmp_path):
    out = tmp_path / "flux.safetensors"
    run_export("--checkpoint_path", real_width_flux, "--format", "original", "--out", out)
    reference = FluxTransformer2DModel.from_pretrained(real_width_flux, subfolder="transformer",
                                                       torch_dtype=torch.bfloat16).state_dict()
    loaded = FluxTransformer2DModel.from_single_file(str(out), config=str(real_width_flux), subfolder="transformer",
                                                     torch_dtype=torch.bfloat16)
    assert_same_tensors(loaded.state_dict(), reference)  # bf16 kept: no value changed
    assert_comfyui_layout("flux", load_file(out), reference)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_diffusers_format_merges_the_shards_into_one_file_of_comfyuis_diffusers_keys(tiny_ckpts, tmp_path, kind):
    folder = tiny_ckpts[kind]
    out = tmp_path / "merged.safetensors"
    run_export("--checkpoint_path", folder, "--format", "diffusers", "--out", out)
    reference = (SD3Transformer2DModel if kind == "sd3" else FluxTransformer2DModel).from_pretrained(
        folder, subfolder="transformer").state_dict()
    merged = load_file(out)
    assert_same_tensors(merged, reference)
    assert set(merged) <= set(comfy_map(kind, reference))  # ComfyUI's convert_diffusers_mmdit knows every key


#################################################################################
#                                   GGUF                                        #
#################################################################################

def sd3_inputs():
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, 16, 8, 8, generator=g), timestep=torch.tensor([500.0]),
                encoder_hidden_states=torch.randn(1, 7, 64, generator=g), pooled_projections=torch.randn(1, 64, generator=g))


def flux_inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.arange(16)
    return dict(hidden_states=torch.randn(1, 16, 64, generator=g), timestep=torch.tensor([0.5]),
                guidance=torch.tensor([3.5]), encoder_hidden_states=torch.randn(1, 8, 4096, generator=g),
                pooled_projections=torch.randn(1, 768, generator=g), txt_ids=torch.zeros(8, 3),
                img_ids=torch.stack([torch.zeros(16), ids // 4, ids % 4], 1).float())


def gguf_types(path):
    """{name: GGMLQuantizationType name} and the architecture of a GGUF file, read with gguf's own reader."""
    reader = gguf.GGUFReader(str(path))
    field = reader.get_field("general.architecture")
    return {t.name: t.tensor_type.name for t in reader.tensors}, bytes(field.parts[field.data[0]]).decode()


def check_gguf_conventions(path, kind, reference, quant):
    """city96's conventions: the architecture; 1-D tensors and those of at most 1,024 elements in F32; --quant only
    on 2-D Linear weights; names of at most 127 characters; exactly ComfyUI's original keys."""
    types, architecture = gguf_types(path)
    assert architecture == kind
    mapping = comfy_map(kind, reference)
    assert set(types) == {mapping[k][0] for k in reference}
    shapes = {}
    for key, value in reference.items():
        original, _, rows, _ = mapping[key]
        shape = list(value.shape)
        shapes[original] = [shapes.get(original, [0])[0] + shape[0], *shape[1:]] if rows is not None else shape
    for name, qtype in types.items():
        small = len(shapes[name]) <= 1 or torch.Size(shapes[name]).numel() <= 1024
        assert len(name) <= 127
        assert (qtype == "F32") == small, (name, qtype)
        if qtype == quant and quant != "F16":
            assert len(shapes[name]) == 2 and name.endswith(".weight"), name
    assert quant in types.values()


@pytest.mark.parametrize("quant", ["F16", "Q8_0"])
def test_sd3_gguf_loads_through_diffusers_gguf_support_with_its_outputs(tiny_ckpts, tmp_path, quant):
    folder = tiny_ckpts["sd3"]
    out = tmp_path / "sd3.gguf"
    run_export("--checkpoint_path", folder, "--format", "gguf", "--quant", quant, "--out", out)
    reference = SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer").eval()
    state = reference.state_dict()
    check_gguf_conventions(out, "sd3", state, quant)
    model = SD3Transformer2DModel.from_single_file(
        str(out), config=str(folder), subfolder="transformer", torch_dtype=torch.float32,
        quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32))
    with torch.no_grad():
        expected, got = reference(**sd3_inputs()).sample, model(**sd3_inputs()).sample
    error = ((got - expected).norm() / expected.norm()).item()
    print(f"GGUF {quant}: relative error {error:.2e}")
    if quant == "F16":  # exactly the model with the tensors the file stores in F16 rounded to fp16
        types, _ = gguf_types(out)
        mapping = comfy_map("sd3", state)
        reference.load_state_dict({k: v.half().float() if types[mapping[k][0]] == "F16" else v
                                   for k, v in state.items()})
        with torch.no_grad():
            torch.testing.assert_close(got, reference(**sd3_inputs()).sample, rtol=0, atol=1e-6)
        assert error > 0  # something was rounded
    else:
        assert 0 < error < GGUF_Q8_BOUND
        assert any(type(m).__name__ == "GGUFLinear" for m in model.modules())


def test_gguf_quant_defaults_to_the_checkpoints_own_precision(tiny_ckpts, tmp_path):
    """Left out, --quant is BF16 for a bf16 checkpoint and F16 otherwise (city96's converter's choice)."""
    bf16 = tmp_path / "bf16"
    FluxTransformer2DModel.from_pretrained(tiny_ckpts["flux"], subfolder="transformer").to(torch.bfloat16).save_pretrained(
        bf16 / "transformer")
    for folder, expected in ((tiny_ckpts["flux"], "F16"), (bf16, "BF16")):
        out = tmp_path / f"{expected}.gguf"
        run_export("--checkpoint_path", folder, "--format", "gguf", "--out", out)
        types, _ = gguf_types(out)
        assert types["double_blocks.0.img_mlp.0.weight"] == expected and set(types.values()) <= {expected, "F32"}


def test_flux_gguf_of_the_real_width_model_loads_through_diffusers_with_its_outputs(real_width_flux, tmp_path):
    reference = FluxTransformer2DModel.from_pretrained(real_width_flux, subfolder="transformer",
                                                       torch_dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference(**flux_inputs()).sample
    for quant in ("BF16", "Q8_0"):
        out = tmp_path / f"flux-{quant}.gguf"
        run_export("--checkpoint_path", real_width_flux, "--format", "gguf", "--quant", quant, "--out", out)
        check_gguf_conventions(out, "flux", reference.state_dict(), quant)
        model = FluxTransformer2DModel.from_single_file(
            str(out), config=str(real_width_flux), subfolder="transformer", torch_dtype=torch.float32,
            quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32))
        with torch.no_grad():
            got = model(**flux_inputs()).sample
        error = ((got - expected).norm() / expected.norm()).item()
        print(f"real-width Flux GGUF {quant}: relative error {error:.2e}")
        if quant == "BF16":  # the checkpoint is bf16: nothing changes
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
        else:
            assert 0 < error < GGUF_Q8_BOUND


#################################################################################
#               What --checkpoint_path stands for; adapters fused in            #
#################################################################################

def test_checkpoint_n_folders_and_fused_adapters_export_the_weights_diffusers_would_run(tiny_ckpts, tmp_path):
    base = tiny_ckpts["sd3"]
    load = lambda out: SD3Transformer2DModel.from_single_file(str(out), config=str(base),
                                                              subfolder="transformer").state_dict()
    # A full fine-tune's checkpoint-N: its own transformer/, the base pipeline recorded beside it.
    tuned = SD3Transformer2DModel.from_pretrained(base, subfolder="transformer")
    tuned.proj_out.weight.data += 0.5
    full = tmp_path / "run" / "checkpoint-3"
    tuned.save_pretrained(full / "transformer")
    (full / "trainer_state.json").write_text(json.dumps({"global_step": 3, "base_pipeline": str(base)}))
    run_export("--checkpoint_path", full, "--format", "original", "--out", tmp_path / "full.safetensors")
    assert_same_tensors(load(tmp_path / "full.safetensors"), tuned.state_dict())

    # A LoRA run's checkpoint-N (its adapter, no transformer/): the base with the adapter fused, as diffusers fuses.
    adapted = tmp_path / "lora-run" / "checkpoint-2"
    adapter = random_adapter(SD3Transformer2DModel.from_pretrained(base, subfolder="transformer"), adapted)
    (adapted / "trainer_state.json").write_text(json.dumps({"global_step": 2, "base_pipeline": str(base)}))
    run_export("--checkpoint_path", adapted, "--format", "original", "--out", tmp_path / "lora.safetensors")
    fused = diffusers_fused(SD3Transformer2DModel.from_pretrained(base, subfolder="transformer"), adapter)
    loaded = load(tmp_path / "lora.safetensors")
    for key in fused:
        torch.testing.assert_close(loaded[key], fused[key], rtol=0, atol=1e-6)
    # The LoRA run's output folder: the base named in its train_summary.json.
    output = tmp_path / "lora-run"
    (output / lora.WEIGHT_NAME).write_bytes(adapter.read_bytes())
    (output / "train_summary.json").write_text(json.dumps({"settings": {"pretrained_model_name_or_path": str(base)}}))
    run_export("--checkpoint_path", output, "--format", "original", "--out", tmp_path / "output.safetensors")
    assert_same_tensors(load(tmp_path / "output.safetensors"), loaded)
    assert not torch.equal(loaded["transformer_blocks.0.attn.to_q.weight"],
                           SD3Transformer2DModel.from_pretrained(base, subfolder="transformer").state_dict()[
                               "transformer_blocks.0.attn.to_q.weight"])

    # The base and --lora_path with --lora_scale: fuse_lora(lora_scale=0.5).
    run_export("--checkpoint_path", base, "--lora_path", adapter, "--lora_scale", "0.5", "--format", "diffusers",
               "--out", tmp_path / "half.safetensors")
    half = load_file(tmp_path / "half.safetensors")
    fused_half = diffusers_fused(SD3Transformer2DModel.from_pretrained(base, subfolder="transformer"), adapter, 0.5)
    for key in fused_half:
        torch.testing.assert_close(half[key], fused_half[key], rtol=0, atol=1e-6)


def test_dtype_defaults_to_the_checkpoints_own_and_fp8_casts_only_the_linear_weights(tiny_ckpts, tmp_path):
    from exporting.tensor_files import SafetensorsFolder

    source = SafetensorsFolder(tiny_ckpts["flux"] / "transformer")
    outs = {}
    for dtype in (None, "bf16", "fp8_e4m3fn"):
        outs[dtype] = tmp_path / f"{dtype}.safetensors"
        run_export("--checkpoint_path", tiny_ckpts["flux"], "--format", "diffusers", "--out", outs[dtype],
                   *(["--dtype", dtype] if dtype else []))
    files = {dtype: load_file(out) for dtype, out in outs.items()}
    for key in source.shapes:
        original = source.read(key)
        assert torch.equal(files[None][key], original) and files[None][key].dtype == torch.float32  # bit for bit
        assert files["bf16"][key].dtype == torch.bfloat16 and torch.equal(files["bf16"][key], original.bfloat16())
        fp8 = files["fp8_e4m3fn"][key]
        want = original.to(torch.float8_e4m3fn) if original.dim() == 2 else original  # biases, norms, 1-D: kept
        assert fp8.dtype == want.dtype and torch.equal(fp8.float(), want.float()), key


#################################################################################
#                      Streaming: less memory than the weights                  #
#################################################################################

@pytest.mark.parametrize("fmt", ["original", "gguf"])
def test_exporting_needs_far_less_memory_than_the_weights(real_width_flux, tmp_path, fmt):
    from bench.bench_export import run, weight_bytes

    out = tmp_path / f"flux.{'gguf' if fmt == 'gguf' else 'safetensors'}"
    result = run({"export": ["--checkpoint_path", str(real_width_flux), "--format", fmt, "--out", str(out),
                             *(["--quant", "Q8_0"] if fmt == "gguf" else [])]})
    weights = weight_bytes(real_width_flux / "transformer")
    print(f"{fmt}: peak RSS {result['growth'] / 2**20:.0f} MiB above the imports, weights {weights / 2**20:.0f} MiB")
    assert out.is_file() and result["growth"] < 0.5 * weights


#################################################################################
#                         Mistakes: one line, nothing written                   #
#################################################################################

@pytest.mark.parametrize("argv, message", [
    (["--format", "original", "--out", "x.safetensors"], "--format original needs --checkpoint_path"),
    (["--checkpoint_path", "{sd3}", "--format", "original", "--quant", "Q8_0", "--out", "x.safetensors"],
     "--quant applies only to --format gguf"),
    (["--checkpoint_path", "{sd3}", "--format", "gguf", "--dtype", "bf16", "--out", "x.gguf"],
     "--dtype applies only to the safetensors formats"),
    (["--checkpoint_path", "{sd3}", "--format", "gguf", "--out", "x.safetensors"], "writes a .gguf file"),
    (["--checkpoint_path", "{sd3}", "--format", "original", "--lora_scale", "0.5", "--out", "x.safetensors"],
     "--lora_scale applies only to an adapter fused"),
    (["--checkpoint_path", "{sd3}/vae", "--format", "original", "--out", "x.safetensors"], "not an SD3 or Flux"),
    (["--checkpoint_path", "{tmp}/missing", "--format", "diffusers", "--out", "x.safetensors"], "does not exist"),
    (["--checkpoint_path", "{sd3}", "--format", "original", "--lora_path", "{flux_adapter}", "--out", "x.safetensors"],
     "does not fit this model|which this model has not"),
], ids=["no-checkpoint", "quant-not-gguf", "dtype-gguf", "suffix", "lora-scale-alone", "vae-folder", "missing",
        "other-models-adapter"])
def test_mistakes_are_refused_before_anything_is_written(tiny_ckpts, tmp_path, argv, message):
    flux_adapter = random_adapter(FluxTransformer2DModel.from_pretrained(tiny_ckpts["flux"], subfolder="transformer"),
                                  tmp_path / "flux-lora")
    argv = [a.format(sd3=tiny_ckpts["sd3"], tmp=tmp_path, flux_adapter=flux_adapter) for a in argv]
    argv = [str(tmp_path / a) if a.startswith("x.") else a for a in argv]
    with pytest.raises(UsageError, match=message):
        run_export(*argv)
    assert not list(tmp_path.glob("x.*")) and not list(tmp_path.glob(".x.*"))


def test_a_mistake_is_one_line_exit_2_and_an_existing_file_is_kept(tiny_ckpts, tmp_path, repo_root):
    out = tmp_path / "kept.safetensors"
    out.write_bytes(b"mine")
    done = subprocess.run([sys.executable, "export.py", "--checkpoint_path", str(tiny_ckpts["sd3"]), "--format",
                           "original", "--out", str(out)], cwd=repo_root, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("export.py: error: --out ")
    assert "--overwrite" in done.stderr and out.read_bytes() == b"mine"
