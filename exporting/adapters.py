"""LoRA adapters written by the trainers (diffusers' format, lora.py), read once, and rewritten for other tools.

An adapter adds scale * B A to the weight of each adapted Linear layer, scale = alpha / r (alpha / sqrt(r) with
rsLoRA). diffusers keeps alpha only in the file header (`lora_adapter_metadata`); ComfyUI and Forge read an
`<module>.alpha` tensor and otherwise apply scale 1. So:
    comfy   diffusers' keys (transformer.<module>.lora_A / lora_B.weight), scale folded into lora_B, the header's
            alpha set to r: ComfyUI (scale 1) and diffusers (alpha / r = 1) both apply the adapter as trained.
    kohya   lora_unet_<original module, dots as underscores>.lora_down / lora_up.weight and .alpha, the form
            kohya's sd-scripts and Forge write; the scale folded into lora_up and alpha = the rank, since some
            loaders read no alpha for some layers (diffusers' Flux kohya converter ignores it for final_layer). A
            fused original layer (q/k/v in one matrix, Flux's linear1) gets down = [A_1; ...; A_k] and the
            block-diagonal up = scale * diag(B_1, ..., B_k), a zero block for each part the adapter does not touch:
            up @ down stacks each part's scale * B A.
"""
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

import lora
from checkpoints import TRAINER_STATE
from errors import UsageError
from exporting.layouts import original_layout, original_modules
from exporting.tensor_files import TensorSpec, read_safetensors_header

PREFIX = "transformer."
A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"


@dataclass
class Adapter:
    """A plain LoRA adapter: {diffusers module: (A, B)}, its rank and scale, the header's metadata."""
    path: Path
    modules: dict
    rank: int
    scale: float
    metadata: dict

    def delta(self, module):
        """scale * B A in fp32: what fusing adds to `module`'s weight (as peft computes it: the product, then the
        scale)."""
        a, b = self.modules[module]
        return (b.to(torch.float32) @ a.to(torch.float32)) * self.scale


def read_adapter(lora_path):
    """The Adapter of `--lora_path` (a file, or a run's output or checkpoint-N folder). UsageError, in one line, for
    DoRA, for per-module ranks or alphas, for text-encoder adapters and for anything not in diffusers' format."""
    path = lora.adapter_file(lora_path)
    lora.read_adapter_shapes(path)  # a readable safetensors file, or one line saying it is not
    tensors = load_file(str(path))
    config = lora.read_adapter_config(path)
    if config.get("use_dora") or any("lora_magnitude_vector" in key for key in tensors):
        raise UsageError(f"--lora_path {path} is a DoRA adapter: export.py converts plain LoRA only (ComfyUI's DoRA "
                         f"uses its own dora_scale convention); fuse it with diffusers' fuse_lora and export the "
                         f"fused model folder instead.")
    others = sorted(k for k in tensors if not k.startswith(PREFIX))
    if others:
        raise UsageError(f"--lora_path {path} also adapts other components ({others[0]}, ...): export.py converts "
                         f"transformer adapters only.")
    patterns = [name for name in ("rank_pattern", "alpha_pattern") if config.get(name)]
    if patterns:
        raise UsageError(f"--lora_path {path} sets {' and '.join(patterns)} (per-module ranks or alphas), which "
                         f"export.py does not convert: train with one --lora_rank and --lora_alpha.")
    modules = {}
    for key, value in tensors.items():
        if key.endswith(A_SUFFIX):
            module = key[len(PREFIX):-len(A_SUFFIX)]
            b = tensors.get(f"{PREFIX}{module}{B_SUFFIX}")
            if b is None:
                raise UsageError(f"--lora_path {path}: {key} has no matching lora_B weight; the file is incomplete.")
            modules[module] = (value, b)
        elif not key.endswith(B_SUFFIX):
            raise UsageError(f"--lora_path {path}: tensor {key} is not a LoRA weight in diffusers' format.")
    if not modules:
        raise UsageError(f"--lora_path {path} holds no LoRA weights.")
    ranks = {a.shape[0] for a, _ in modules.values()}
    rank = config.get("r", min(ranks))
    if ranks != {rank}:
        raise UsageError(f"--lora_path {path}: its layers have ranks {sorted(ranks)} but its header says r = {rank}; "
                         f"the file is not one adapter as the trainers write it.")
    alpha = config.get("lora_alpha", rank)  # no header: diffusers loads it with alpha = r
    scale = alpha / rank ** 0.5 if config.get("use_rslora") else alpha / rank
    header = json.loads(read_safetensors_header(path)[1].get("lora_adapter_metadata") or "{}")
    return Adapter(path, modules, rank, scale, header)


def check_fits(adapter, shapes):
    """UsageError unless every adapted module is a Linear weight of the model whose tensor shapes are `shapes`
    (read from the checkpoint's headers), with the adapter's in / out widths."""
    for module, (a, b) in adapter.modules.items():
        shape = shapes.get(module + ".weight")
        if shape is None or len(shape) != 2:
            raise UsageError(f"--lora_path {adapter.path} adapts {module}, which this model has not as a Linear "
                             f"layer: the adapter was trained for another model.")
        if (b.shape[0], a.shape[1]) != tuple(shape):
            raise UsageError(f"--lora_path {adapter.path} does not fit this model: {module} is {shape[1]} -> "
                             f"{shape[0]} here, {a.shape[1]} -> {b.shape[0]} in the adapter.")


def base_of_adapter(lora_path):
    """The base model of a LoRA run's output or checkpoint-N folder (what --checkpoint_path would be), or None for a
    bare file: checkpoint-N records it in trainer_state.json, an output folder in train_summary.json."""
    folder = Path(lora_path) if Path(lora_path).is_dir() else Path(lora_path).parent
    records = [(folder / TRAINER_STATE, lambda r: r.get("base_pipeline")),
               (folder / "train_summary.json", lambda r: r.get("settings", {}).get("pretrained_model_name_or_path"))]
    for record, base in records:
        if record.is_file():
            found = base(json.loads(record.read_text()))
            if found:
                return found
    return None


#################################################################################
#                              The two file forms                               #
#################################################################################

def comfy_specs(adapter, dtype=None):
    """(TensorSpecs, header metadata) of the comfy form: diffusers' keys, scale folded into lora_B, header alpha = r."""
    specs = []
    for module, (a, b) in sorted(adapter.modules.items()):
        out = dtype or b.dtype
        specs.append(TensorSpec(f"{PREFIX}{module}{A_SUFFIX}", dtype or a.dtype, tuple(a.shape),
                                lambda a=a, out=dtype or a.dtype: a.to(out)))
        specs.append(TensorSpec(f"{PREFIX}{module}{B_SUFFIX}", out, tuple(b.shape),
                                lambda b=b, out=out: (b.to(torch.float32) * adapter.scale).to(out)))
    header = dict(adapter.metadata)
    if header:  # diffusers reads alpha from here: r makes its scale 1, the fold having applied the trained one
        header.update({f"{PREFIX}lora_alpha": adapter.rank, f"{PREFIX}use_rslora": False})
    metadata = {"format": "pt", "diffusion4k.lora_scale_folded": repr(adapter.scale)}
    if header:
        metadata["lora_adapter_metadata"] = json.dumps(header, indent=2, sort_keys=True)
    return specs, metadata


def kohya_name(original_module):
    return "lora_unet_" + original_module.replace(".", "_")


def kohya_specs(adapter, kind, shapes, dtype=None):
    """TensorSpecs of the kohya form (lora_unet_<original module>.lora_down / lora_up.weight and .alpha) for a `kind`
    transformer whose diffusers tensor shapes are `shapes`: fused original layers as the module docstring says."""
    placement = original_modules(kind, shapes)
    swapped = {t.name[:-len(".weight")] for t in original_layout(kind, shapes)
               if t.swap_halves and t.name.endswith(".weight")}
    grouped = {}
    for module in adapter.modules:
        grouped.setdefault(placement[module], []).append(module)
    specs = []
    for target in sorted(grouped, key=lambda t: t.name):
        a0 = adapter.modules[grouped[target][0]][0]
        out = dtype or a0.dtype
        downs, ups = [], []
        for part in target.parts:
            rows = shapes[part + ".weight"][0]
            a, b = adapter.modules.get(part, (torch.zeros(adapter.rank, a0.shape[1], dtype=a0.dtype),
                                              torch.zeros(rows, adapter.rank, dtype=a0.dtype)))
            downs.append(a)
            ups.append(b)
        down = torch.cat(downs)
        up = torch.block_diag(*ups).to(torch.float32) * adapter.scale
        if target.name in swapped:  # the original stores (shift, scale): so do the rows of up @ down
            up = torch.cat(up.chunk(2)[::-1])
        name = kohya_name(target.name)
        specs += [TensorSpec(f"{name}.lora_down.weight", out, tuple(down.shape), lambda t=down, o=out: t.to(o)),
                  TensorSpec(f"{name}.lora_up.weight", out, tuple(up.shape), lambda t=up, o=out: t.to(o)),
                  TensorSpec(f"{name}.alpha", torch.float32, (),
                             lambda rank=down.shape[0]: torch.tensor(float(rank), dtype=torch.float32))]
    return specs



def export_lora(adapter, out, lora_format="comfy", kind=None, shapes=None, dtype=None):
    """Write `adapter` to `out` in `lora_format`; `kind` and `shapes` (the base transformer's diffusers tensor shapes)
    are checked against when given, and needed by the kohya form. Returns {"tensors": count, "file": path}."""
    from exporting.tensor_files import write_safetensors

    if shapes is not None:
        check_fits(adapter, shapes)
    if lora_format == "comfy":
        specs, metadata = comfy_specs(adapter, dtype)
    else:
        specs = kohya_specs(adapter, kind, shapes, dtype)
        metadata = {"format": "pt"}
    write_safetensors(out, specs, metadata)
    return {"tensors": len(specs), "file": str(out)}
