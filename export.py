"""Export a fine-tuned model to the single files ComfyUI, Forge and kohya's sd-scripts load (docs/export.md).

    --format original   the transformer in its original layout (SD3: Stability AI's, Flux: Black Forest Labs')
    --format diffusers  the transformer's shards merged into one file with diffusers' keys
    --format gguf       the original layout as GGUF (city96's ComfyUI-GGUF conventions), --quant F16 | BF16 | Q8_0
    --format vae        the F=16 VAE in the LDM layout, its factor and --vae_mode in the file's metadata
    --format lora       a LoRA adapter: --lora_format comfy (alpha folded in) or kohya (lora_unet_ keys, .alpha)
Every file is written one tensor at a time: a model larger than the memory exports.
"""
import argparse
from pathlib import Path

from errors import HelpFormatter, UsageError, exit_on_usage_error
from exporting.adapters import base_of_adapter, export_lora, read_adapter
from exporting.tensor_files import SafetensorsFolder
from exporting.transformer import DTYPES, GGUF_TYPES, export_transformer, find_source
from exporting.vae import export_vae
from partitioned_vae import DECODE_MODES

FORMATS = ("original", "diffusers", "gguf", "vae", "lora")
LORA_FORMATS = ("comfy", "kohya")


def check_flags(args):
    """UsageError, naming the flag, for a combination that cannot export, before anything is read."""
    fmt = args.format
    suffix = ".gguf" if fmt == "gguf" else ".safetensors"
    if Path(args.out).suffix != suffix and fmt != "vae":  # vae: its own message (the metadata)
        raise UsageError(f"--out {args.out}: --format {fmt} writes a {suffix} file; name it NAME{suffix}.")
    if Path(args.out).exists() and not args.overwrite:
        raise UsageError(f"--out {args.out} exists: choose another name, or add --overwrite to replace it.")
    needs = {"lora": "--lora_path"}.get(fmt, "--checkpoint_path")
    if (fmt == "lora" and args.lora_path is None) or (fmt != "lora" and args.checkpoint_path is None):
        raise UsageError(f"--format {fmt} needs {needs}.")
    misplaced = [(args.quant is not None and fmt != "gguf", "--quant", "--format gguf"),
                 (args.dtype is not None and fmt == "gguf", "--dtype", "the safetensors formats (GGUF: --quant)"),
                 (args.lora_format is not None and fmt != "lora", "--lora_format", "--format lora"),
                 (args.vae_mode is not None and fmt != "vae", "--vae_mode", "--format vae"),
                 (args.lora_path is not None and fmt == "vae", "--lora_path", "the transformer formats and lora"),
                 (args.lora_scale != 1.0 and (fmt in ("lora", "vae") or args.lora_path is None), "--lora_scale",
                  "an adapter fused into --format original / diffusers / gguf (ComfyUI sets a LoRA's strength "
                  "in its loader)")]
    for wrong, flag, where in misplaced:
        if wrong:
            raise UsageError(f"{flag} applies only to {where}.")


def main(args):
    check_flags(args)
    dtype = DTYPES[args.dtype] if args.dtype else None
    if args.format == "vae":
        result = export_vae(args.checkpoint_path, args.out, args.vae_mode, dtype)
    elif args.format == "lora":
        adapter = read_adapter(args.lora_path)
        base = args.checkpoint_path or base_of_adapter(args.lora_path)
        lora_format = args.lora_format or "comfy"
        if base is None and lora_format == "kohya":
            raise UsageError(f"--lora_format kohya names the base model's original layers: add --checkpoint_path "
                             f"with the base pipeline {args.lora_path} was trained on.")
        source = find_source(base) if base is not None else None
        result = export_lora(adapter, args.out, lora_format, source and source.kind,
                             source and SafetensorsFolder(source.folder).shapes, dtype)
    else:
        source = find_source(args.checkpoint_path, args.lora_path, args.lora_scale)
        result = export_transformer(source, args.format, args.out, dtype, args.quant)
    print(f"export.py: wrote {result['tensors']} tensors to {result['file']}")
    return result


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--checkpoint_path", default=None,
                        help="what the trainers write: a pipeline folder, a checkpoint-N folder (a LoRA one is "
                             "fused into its base), or a transformer / VAE folder; for --format lora: the base "
                             "pipeline (found from the run folder when left out)")
    parser.add_argument("--format", required=True, choices=FORMATS, help="what to write (see above)")
    parser.add_argument("--out", required=True, help="the file to write (.safetensors; .gguf for --format gguf)")
    parser.add_argument("--dtype", default=None, choices=tuple(DTYPES),
                        help="cast the weights (fp8_e4m3fn: the 2-D Linear weights only); default: the checkpoint's "
                             "own dtype, so that no value changes")
    parser.add_argument("--quant", default=None, choices=GGUF_TYPES,
                        help="GGUF type of the Linear weights (the rest stays F32 / F16); default: BF16 for a bf16 "
                             "checkpoint, else F16")
    parser.add_argument("--lora_path", default=None,
                        help="a LoRA adapter (a .safetensors file, or a LoRA run's output or checkpoint-N folder): "
                             "fused into the weights of --format original / diffusers / gguf, or converted by "
                             "--format lora")
    parser.add_argument("--lora_scale", type=float, default=1.0,
                        help="weight of the fused adapter (1: as trained)")
    parser.add_argument("--lora_format", default=None, choices=LORA_FORMATS,
                        help="--format lora: comfy (diffusers' keys, alpha folded in; ComfyUI and diffusers) or "
                             "kohya (lora_unet_ keys with .alpha; sd-scripts, Forge, ComfyUI); default: comfy")
    parser.add_argument("--vae_mode", default=None, choices=DECODE_MODES,
                        help="--format vae: the decode mode recorded in the file (authors: the released "
                             "flux_wavelet_v2_sc); default: the mode a saved F=16 VAE recorded, else partitioned")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return parser.parse_args(argv)


if __name__ == "__main__":
    exit_on_usage_error("export.py", main, parse_args())
