"""The F=16 VAE for ComfyUI: export.py --format vae (diffusers' single-file loader, ComfyUI's LDM keys, the metadata)
and the node pack in comfyui/ (loaded as ComfyUI loads a custom node; its math on a stand-in of ComfyUI's VAE object
holding the VAE in ComfyUI's LDM layout, against partitioned_vae on the same weights; the workflow in
docs/comfyui.md). ComfyUI itself is not installed here."""
import importlib.util
import json
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors import safe_open
from safetensors.torch import load_file

import export
from comfyui_keys import VAE_LDM
from errors import UsageError
from partitioned_vae import DECODE_MODES, load_vae

PACK_NAME = "diffusion-4k"


def run_export(*argv):
    return export.main(export.parse_args([str(a) for a in argv]))


def load_pack(folder, name=PACK_NAME):
    """Load `folder`/__init__.py as ComfyUI's load_custom_node does (a module spec from the file, registered in
    sys.modules under the folder's name, then executed)."""
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pack(repo_root):
    return load_pack(repo_root / "comfyui")


#################################################################################
#                             The F=16 VAE file                                 #
#################################################################################

@pytest.fixture(scope="module")
def ldm_vae(tiny_ckpts, tmp_path_factory):
    """The tiny Flux VAE written by export.py --format vae (mode authors): the LDM layout ComfyUI's VAELoader reads."""
    out = tmp_path_factory.mktemp("vae") / "vae.safetensors"
    run_export("--checkpoint_path", tiny_ckpts["flux"], "--format", "vae", "--vae_mode", "authors", "--out", out)
    return out


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_vae_export_loads_bit_identical_with_diffusers_single_file_and_has_comfyuis_ldm_keys(tiny_ckpts, tmp_path, kind):
    out = tmp_path / "vae.safetensors"
    run_export("--checkpoint_path", tiny_ckpts[kind], "--format", "vae", "--out", out)
    reference = AutoencoderKL.from_pretrained(tiny_ckpts[kind], subfolder="vae").state_dict()
    loaded = AutoencoderKL.from_single_file(str(out), config=str(tiny_ckpts[kind]), subfolder="vae").state_dict()
    assert loaded.keys() == reference.keys()
    assert all(torch.equal(loaded[k], reference[k]) for k in reference)
    keys = load_file(out).keys()
    assert len(keys) == len(reference) and not [k for k in keys if not any(re.fullmatch(p, k) for p in VAE_LDM)]


def test_vae_file_says_f16_and_its_mode_and_a_format_without_metadata_is_refused(tiny_ckpts, ldm_vae, tmp_path):
    with safe_open(str(ldm_vae), "pt") as f:
        metadata = f.metadata()
    assert metadata["diffusion4k.vae_factor"] == "16" and metadata["diffusion4k.vae_mode"] == "authors"
    # Left out, --vae_mode is what a saved F=16 VAE recorded (an SC-VAE run's output), else partitioned.
    saved = load_vae(tiny_ckpts["sd3"], mode="subpixel")
    saved.save_pretrained(tmp_path / "sc-vae")
    run_export("--checkpoint_path", tmp_path / "sc-vae", "--format", "vae", "--out", tmp_path / "saved.safetensors")
    run_export("--checkpoint_path", tiny_ckpts["sd3"], "--format", "vae", "--out", tmp_path / "stock.safetensors")
    for name, mode in (("saved", "subpixel"), ("stock", "partitioned")):
        with safe_open(str(tmp_path / f"{name}.safetensors"), "pt") as f:
            assert f.metadata()["diffusion4k.vae_mode"] == mode
    for suffix in (".ckpt", ".pt"):
        with pytest.raises(UsageError, match="only a .safetensors file carries metadata"):
            run_export("--checkpoint_path", tiny_ckpts["sd3"], "--format", "vae", "--out", tmp_path / f"vae{suffix}")
        assert not (tmp_path / f"vae{suffix}").exists()


#################################################################################
#                       The pack, loaded as ComfyUI loads it                    #
#################################################################################

def test_the_pack_loads_by_file_path_without_comfyui_or_the_repository_on_sys_path(repo_root, tmp_path):
    nodes = tmp_path / "ComfyUI" / "custom_nodes"
    nodes.mkdir(parents=True)
    (nodes / PACK_NAME).symlink_to(repo_root / "comfyui")
    copied = nodes / "copied"
    copied.mkdir()
    for name in ("__init__.py", "nodes.py", "project.py"):
        (copied / name).write_text((repo_root / "comfyui" / name).read_text())
    script = textwrap.dedent(f"""
        import importlib.util, json, sys, types
        assert not any(p and "{repo_root}" == p.rstrip("/") for p in sys.path)
        sys.modules["errors"] = types.ModuleType("errors")  # another pack's module of the same name
        def load(folder, name):
            spec = importlib.util.spec_from_file_location(name, folder + "/__init__.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
            return module
        pack = load("{nodes / PACK_NAME}", "{PACK_NAME}")
        latent = pack.NODE_CLASS_MAPPINGS["Diffusion4K_EmptyLatentF16"]().generate(4096, 4096, 2)[0]["samples"]
        try:
            load("{copied}", "copied")
            copy_error = None
        except ImportError as error:
            copy_error = str(error)
        print(json.dumps({{"classes": sorted(pack.NODE_CLASS_MAPPINGS), "names": pack.NODE_DISPLAY_NAME_MAPPINGS,
                          "latent": list(latent.shape), "comfy": "comfy" in sys.modules,
                          "root_on_path": any(p.rstrip("/") == "{repo_root}" for p in sys.path),
                          "errors_kept": not hasattr(sys.modules["errors"], "UsageError"),
                          "copy_error": copy_error}}))
        """)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["names"] == {"Diffusion4K_VAEDecodeF16": "VAE Decode (F=16, Diffusion-4K)",
                               "Diffusion4K_VAEEncodeF16": "VAE Encode (F=16)",
                               "Diffusion4K_EmptyLatentF16": "Empty Latent (F=16)"}
    assert result["classes"] == sorted(result["names"])
    assert result["latent"] == [2, 16, 256, 256]  # 4096^2 -> 256^2
    assert not result["comfy"] and not result["root_on_path"] and result["errors_kept"]
    assert "Link the repository's comfyui/ folder" in result["copy_error"]


def test_empty_latent_is_zeros_of_a_sixteenth_and_refuses_sizes_the_models_cannot_take(pack):
    node = pack.NODE_CLASS_MAPPINGS["Diffusion4K_EmptyLatentF16"]()
    (latent,) = node.generate(width=3072, height=4096, batch_size=3)
    assert latent["samples"].shape == (3, 16, 256, 192) and not latent["samples"].any()
    with pytest.raises(ValueError, match="not a multiple of 32"):
        node.generate(width=1000, height=1024)


#################################################################################
#             The nodes' math on a VAE in ComfyUI's LDM layout                  #
#################################################################################

class ComfyVAEStandIn:
    """ComfyUI's VAE object as comfy/sd.py's VAE class defines it, reduced to what the nodes touch: first_stage_model
    (here diffusers' AutoencoderKL loaded from the LDM file by its single-file loader, wrapped so that decode / encode
    return tensors as ComfyUI's do; `encoder` and `decoder` are its modules), downscale_ratio and upscale_ratio 8,
    latent_channels, memory_used_decode, and decode / encode that allocate their outputs from the ratios (ComfyUI:
    `torch.empty((B, 3, round(h * upscale_ratio), ...))`; encode crops the pixels to multiples of downscale_ratio)."""

    def __init__(self, autoencoder):
        self.first_stage_model = torch.nn.Module()
        self.first_stage_model.encoder, self.first_stage_model.decoder = autoencoder.encoder, autoencoder.decoder
        self.autoencoder = autoencoder
        self.downscale_ratio = self.upscale_ratio = 8
        self.latent_channels = 16
        self.memory_used_decode = lambda shape, dtype: 2178 * shape[2] * shape[3] * 64 * 4

    def decode(self, samples):
        b, _, h, w = samples.shape
        out = torch.empty(b, 3, round(h * self.upscale_ratio), round(w * self.upscale_ratio))
        with torch.no_grad():
            out[:] = torch.clamp((self.autoencoder.decode(samples).sample + 1) / 2, 0, 1)
        return out.movedim(1, -1)

    def encode(self, pixels):
        h, w = (pixels.shape[1] // self.downscale_ratio) * self.downscale_ratio, (pixels.shape[2] // self.downscale_ratio) * self.downscale_ratio
        pixels = pixels[:, :h, :w].movedim(-1, 1)
        out = torch.empty(pixels.shape[0], self.latent_channels, h // self.downscale_ratio, w // self.downscale_ratio)
        with torch.no_grad():
            out[:] = self.autoencoder.encode(2 * pixels - 1).latent_dist.mean
        return out


def test_nodes_decode_and_encode_as_partitioned_vae_in_every_mode(pack, tiny_ckpts, ldm_vae):
    ldm = AutoencoderKL.from_single_file(str(ldm_vae), config=str(tiny_ckpts["flux"]), subfolder="vae").eval()
    vae = ComfyVAEStandIn(ldm)
    decode = pack.NODE_CLASS_MAPPINGS["Diffusion4K_VAEDecodeF16"]()
    encode = pack.NODE_CLASS_MAPPINGS["Diffusion4K_VAEEncodeF16"]()
    latents = torch.randn(2, 16, 6, 10, generator=torch.Generator().manual_seed(0))  # non-square
    images = {}
    for mode in DECODE_MODES:
        (images[mode],) = decode.decode({"samples": latents}, vae, mode, 2)
        reference = load_vae(tiny_ckpts["flux"], mode=mode, grid=2).eval()
        with torch.no_grad():
            expected = torch.clamp((reference.decode(latents).sample + 1) / 2, 0, 1).movedim(1, -1)
        assert images[mode].shape == (2, 96, 160, 3)
        torch.testing.assert_close(images[mode], expected, rtol=0, atol=1e-6)
    assert (images["authors"] - images["partitioned"]).abs().max() > 1e-3  # the modes reach the decoder

    pixels = images["partitioned"]
    (latent,) = encode.encode(torch.cat([pixels, torch.ones_like(pixels[..., :1])], -1), vae)  # RGBA: alpha dropped
    reference = load_vae(tiny_ckpts["flux"], mode="partitioned").eval()
    with torch.no_grad():
        expected = reference.encode(2 * pixels.movedim(-1, 1) - 1).latent_dist.mean
    assert latent["samples"].shape == (2, 16, 6, 10)
    torch.testing.assert_close(latent["samples"], expected, rtol=0, atol=1e-5)  # 4e-6: a strided input view

    # Afterwards the VAE is the one ComfyUI loaded: a stock decode is F=8 again, and unchanged.
    stock = AutoencoderKL.from_pretrained(tiny_ckpts["flux"], subfolder="vae").eval()
    with torch.no_grad():
        expected = torch.clamp((stock.decode(latents).sample + 1) / 2, 0, 1).movedim(1, -1)
    assert vae.downscale_ratio == vae.upscale_ratio == 8
    torch.testing.assert_close(vae.decode(latents), expected, rtol=0, atol=1e-6)


#################################################################################
#                          The workflow in docs/comfyui.md                      #
#################################################################################

STOCK_NODES = {  # ComfyUI's nodes.py / comfy_extras: each node's required inputs the workflow uses
    "UNETLoader": {"unet_name", "weight_dtype"}, "DualCLIPLoader": {"clip_name1", "clip_name2", "type"},
    "VAELoader": {"vae_name"}, "CLIPTextEncode": {"clip", "text"}, "FluxGuidance": {"conditioning", "guidance"},
    "ModelSamplingFlux": {"model", "max_shift", "base_shift", "width", "height"},
    "KSampler": {"model", "positive", "negative", "latent_image", "seed", "steps", "cfg", "sampler_name", "scheduler",
                 "denoise"},
    "SaveImage": {"images", "filename_prefix"},
}


def test_the_documented_workflow_feeds_the_nodes_what_they_take(pack, repo_root):
    text = (repo_root / "docs" / "comfyui.md").read_text()
    workflow = json.loads(re.search(r"```json\n(.*?)```", text, re.S).group(1))
    for node_id, node in workflow.items():
        kind, inputs = node["class_type"], node["inputs"]
        links = {k: v for k, v in inputs.items() if isinstance(v, list)}
        for name, (source, output) in links.items():
            assert source in workflow and output == 0, (node_id, name)
        if kind in STOCK_NODES:
            assert set(inputs) == STOCK_NODES[kind], kind
            continue
        required = pack.NODE_CLASS_MAPPINGS[kind].INPUT_TYPES()["required"]
        assert set(inputs) == set(required), kind
        for name, value in inputs.items():
            if name in links:
                continue
            spec = required[name]
            if isinstance(spec[0], list):
                assert value in spec[0], (kind, name, value)
            else:
                assert spec[1]["min"] <= value <= spec[1]["max"], (kind, name, value)
    nodes = {node["class_type"]: node["inputs"] for node in workflow.values()}
    assert nodes["Diffusion4K_EmptyLatentF16"]["width"] == nodes["Diffusion4K_EmptyLatentF16"]["height"] == 4096
    assert nodes["Diffusion4K_VAEDecodeF16"]["mode"] == "authors"  # flux_wavelet_v2_sc's decoder
    assert nodes["KSampler"]["steps"] == 50 and nodes["FluxGuidance"]["guidance"] == 5.0  # the paper's Flux settings
    # ModelSamplingFlux counts width * height / 256 tokens: the F=16 latent of 4096^2 has (4096 / 16 / 2)^2
    assert nodes["ModelSamplingFlux"]["width"] * nodes["ModelSamplingFlux"]["height"] / 256 == (4096 // 32) ** 2
