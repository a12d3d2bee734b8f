"""Exporting the F=16 VAE as one file in the LDM layout ComfyUI's VAE loader reads, with metadata that says so.

An F=16 VAE has the stock VAE's tensors (partitioned_vae.py changes no weight), so nothing in the weights tells a
loader to decode at F=16: stock ComfyUI decodes it as F=8 without an error, and the picture is wrong. The file's
safetensors metadata therefore carries the factor and the --vae_mode its decoder needs; a format without metadata
(.ckpt, .pt, .bin) is refused.
"""
import json
from pathlib import Path

from errors import UsageError
from exporting.layouts import ldm_vae_name, ldm_vae_shape
from exporting.tensor_files import SafetensorsFolder, TensorSpec, write_safetensors
from exporting.transformer import output_dtype
from partitioned_vae import VAE_MODES, find_vae_dir

METADATA_FACTOR = "diffusion4k.vae_factor"
METADATA_MODE = "diffusion4k.vae_mode"


def vae_folder_and_mode(checkpoint_path, vae_mode=None):
    """(the VAE folder of a pipeline or VAE folder, the --vae_mode to record: the one given, else the one a saved
    F=16 VAE recorded, else "partitioned")."""
    try:
        folder = find_vae_dir(checkpoint_path)
    except FileNotFoundError as error:
        raise UsageError(f"--checkpoint_path: {error}") from None
    saved = json.loads((folder / "config.json").read_text()).get("f16_vae") or {}
    return folder, vae_mode or saved.get("mode", "partitioned")


def vae_specs(folder, dtype=None):
    """TensorSpecs of the VAE in `folder`, renamed to the LDM layout and cast to --dtype."""
    reader = SafetensorsFolder(folder)
    up_blocks = len(json.loads((Path(folder) / "config.json").read_text())["block_out_channels"])
    specs = []
    for key in sorted(reader.shapes):
        name = ldm_vae_name(key, up_blocks)
        shape = ldm_vae_shape(name, reader.shapes[key])
        out = output_dtype(dtype, reader.dtypes[key], reader.shapes[key])
        specs.append(TensorSpec(name, out, shape, lambda key=key, shape=shape, out=out:
                                reader.read(key).reshape(shape).to(out)))
    return specs


def vae_metadata(mode):
    """The header that says what decodes this file: the factor and the decode mode."""
    factor = VAE_MODES[mode].factor
    return {"format": "pt", METADATA_FACTOR: str(factor), METADATA_MODE: mode,
            "diffusion4k.note": f"F={factor} VAE: decode with the 'VAE Decode (F=16, Diffusion-4K)' node in mode "
                                f"'{mode}'; stock VAE nodes decode it as F=8 and the picture is wrong."}


def export_vae(checkpoint_path, out, vae_mode=None, dtype=None):
    """Write the F=16 VAE of `checkpoint_path` to `out` (.safetensors, LDM layout, factor and mode in its metadata)."""
    if Path(out).suffix != ".safetensors":
        raise UsageError(f"--out {out}: an F=16 VAE must say so in its file's metadata, and only a .safetensors file "
                         f"carries metadata: use --out NAME.safetensors.")
    folder, mode = vae_folder_and_mode(checkpoint_path, vae_mode)
    specs = vae_specs(folder, dtype)
    write_safetensors(out, specs, vae_metadata(mode))
    return {"tensors": len(specs), "file": str(out), "vae_mode": mode}
