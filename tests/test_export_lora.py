"""export.py --format lora against the update the trainer's adapter (alpha != rank) makes under diffusers (the stock
pipeline's load_lora_weights, peft's fused update): the comfy file under ComfyUI's arithmetic and under diffusers'
loader, the kohya file under ComfyUI's arithmetic and key map (tests/comfyui_keys.py) and, for Flux at its real
widths, under diffusers' kohya conversion."""
import json
import subprocess
import sys

import pytest
import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

import export
import lora
from adapter_helpers import diffusers_deltas, load_with_diffusers, random_adapter
from comfyui_keys import comfy_lora_update, comfy_map, diffusers_tensor_of, lora_modules
from errors import UsageError

CLASSES = {"sd3": SD3Transformer2DModel, "flux": FluxTransformer2DModel}
# The trainers' default targets, plus the final AdaLN (and SD3's last context AdaLN): layers the original layout
# stores with their halves swapped.
EXTRA_LAYERS = {"sd3": ("norm_out.linear", "norm1_context.linear"), "flux": ("norm_out.linear",)}
TOLERANCE = 1e-6


def run_export(*argv):
    return export.main(export.parse_args([str(a) for a in argv]))


def base_transformer(kind, folder, dtype=torch.float32):
    return CLASSES[kind].from_pretrained(folder, subfolder="transformer", torch_dtype=dtype)


@pytest.fixture(scope="module")
def adapters(tiny_ckpts, tmp_path_factory):
    """{kind: (base pipeline, the adapter file as the trainer saves it, diffusers' update of each module)}."""
    made = {}
    for kind in ("sd3", "flux"):
        base = tiny_ckpts[kind]
        transformer = base_transformer(kind, base)
        layers = lora.default_lora_layers(transformer) + EXTRA_LAYERS[kind]
        adapter = random_adapter(transformer, tmp_path_factory.mktemp(f"lora-{kind}"), rank=4, alpha=7.0,
                                 layers=layers)
        made[kind] = (base, adapter, diffusers_deltas(base_transformer(kind, base), adapter))
    return made


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_comfy_file_applies_the_trained_update_under_comfyuis_arithmetic_and_diffusers_loader(adapters, tmp_path,
                                                                                              kind):
    base, adapter, expected = adapters[kind]
    assert lora.read_adapter_config(adapter)["lora_alpha"] == 7.0 and max(v.abs().max() for v in expected.values())
    out = tmp_path / "comfy.safetensors"
    run_export("--lora_path", adapter, "--format", "lora", "--out", out)
    state = load_file(out)
    mapping = comfy_map(kind, base_transformer(kind, base).state_dict())
    modules = lora_modules(state)
    assert {m.removeprefix("transformer.") for m in modules} == set(expected)
    for module in modules:  # "transformer.<diffusers weight key>" is ComfyUI's map for SD3 and Flux LoRAs
        assert module.startswith("transformer.") and module.removeprefix("transformer.") + ".weight" in mapping
        torch.testing.assert_close(comfy_lora_update(state, module), expected[module.removeprefix("transformer.")],
                                   rtol=0, atol=TOLERANCE)
    again = diffusers_deltas(base_transformer(kind, base), out)  # diffusers reads the rewritten header: no double scale
    assert again.keys() == expected.keys()
    for module, update in expected.items():
        torch.testing.assert_close(again[module], update, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_kohya_file_applies_the_trained_update_through_comfyuis_key_map(adapters, tmp_path, kind):
    base, adapter, expected = adapters[kind]
    out = tmp_path / "kohya.safetensors"
    run_export("--lora_path", adapter, "--checkpoint_path", base, "--format", "lora", "--lora_format", "kohya",
               "--out", out)
    state = load_file(out)
    mapping = comfy_map(kind, base_transformer(kind, base).state_dict())
    # comfy/lora.py: "lora_unet_" + each original weight key without ".weight", dots as underscores
    kohya_names = {"lora_unet_" + original[:-len(".weight")].replace(".", "_"): original
                   for original, *_ in mapping.values() if original.endswith(".weight")}
    checked = set()
    for module in lora_modules(state):
        original = kohya_names[module]
        update = comfy_lora_update(state, module)
        for key, entry in mapping.items():
            if entry[0] == original:  # each diffusers layer at its rows (halves swapped back where ComfyUI swaps)
                diffusers_module = key[:-len(".weight")]
                want = expected.get(diffusers_module, torch.zeros_like(diffusers_tensor_of(update, entry)))
                torch.testing.assert_close(diffusers_tensor_of(update, entry), want, rtol=0, atol=TOLERANCE)
                checked.add(diffusers_module)
    assert set(expected) <= checked


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # two adapters on purpose
def test_flux_kohya_file_of_the_real_width_model_loads_with_diffusers_kohya_conversion(real_width_flux, tmp_path):
    # The trainers' default targets: diffusers' converter (0.42) writes final_layer's update without the
    # "transformer." prefix, so its loader drops it (docs/export.md); ComfyUI's arithmetic covers that layer above.
    transformer = base_transformer("flux", real_width_flux)
    adapter = random_adapter(transformer, tmp_path / "adapter", rank=4, alpha=7.0)
    out = tmp_path / "kohya.safetensors"
    run_export("--lora_path", adapter, "--checkpoint_path", real_width_flux, "--format", "lora", "--lora_format",
               "kohya", "--out", out)
    assert all(k.startswith("lora_unet_") for k in load_file(out))
    transformer.delete_adapters(lora.ADAPTER_NAME)
    load_with_diffusers(transformer, adapter, "trained")
    load_with_diffusers(transformer, out, "kohya")  # diffusers' kohya conversion (_convert_kohya_flux_lora_to_diffusers)
    compared = 0
    for name, layer in transformer.named_modules():
        if isinstance(layer, LoraLayer) and "kohya" in layer.lora_A:
            got = layer.get_delta_weight("kohya")
            want = layer.get_delta_weight("trained") if "trained" in layer.lora_A else torch.zeros_like(got)
            torch.testing.assert_close(got, want, rtol=0, atol=TOLERANCE)
            compared += "trained" in layer.lora_A
    assert compared == sum(isinstance(m, LoraLayer) and "trained" in m.lora_A for m in transformer.modules()) > 0


def test_dora_is_refused_in_one_line(tiny_ckpts, tmp_path, repo_root):
    transformer = base_transformer("sd3", tiny_ckpts["sd3"])
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, use_dora=True, target_modules=["attn.to_q"]),
                            adapter_name=lora.ADAPTER_NAME)
    adapter = lora.save_lora(StableDiffusion3Pipeline, transformer, tmp_path / "dora")
    out = tmp_path / "out.safetensors"
    done = subprocess.run([sys.executable, "export.py", "--lora_path", str(adapter), "--format", "lora", "--out",
                           str(out)], cwd=repo_root, capture_output=True, text=True)
    assert done.returncode == 2 and not out.exists()
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("export.py: error: --lora_path ") and "DoRA" in last
    with pytest.raises(UsageError, match="DoRA"):  # fused into the weights: refused as well
        run_export("--checkpoint_path", tiny_ckpts["sd3"], "--lora_path", adapter, "--format", "original", "--out", out)
    assert not out.exists()


def test_kohya_needs_the_base_model_and_finds_it_in_the_run_folder(adapters, tmp_path):
    base, adapter, _ = adapters["sd3"]
    bare = tmp_path / "bare.safetensors"
    bare.write_bytes(adapter.read_bytes())
    with pytest.raises(UsageError, match="--lora_format kohya names the base model's original layers"):
        run_export("--lora_path", bare, "--format", "lora", "--lora_format", "kohya", "--out", tmp_path / "k.safetensors")
    checkpoint = tmp_path / "run" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / lora.WEIGHT_NAME).write_bytes(adapter.read_bytes())
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 2, "base_pipeline": str(base)}))
    run_export("--lora_path", checkpoint, "--format", "lora", "--lora_format", "kohya", "--out", tmp_path / "k.safetensors")
    assert (tmp_path / "k.safetensors").is_file()
