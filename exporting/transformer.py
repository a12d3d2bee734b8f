"""Exporting a fine-tuned transformer: what --checkpoint_path stands for, the adapter fused into it, and the tensors
of the three single-file formats (original layout, diffusers keys, GGUF), each read and written one at a time."""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from errors import UsageError
from exporting.adapters import Adapter, base_of_adapter, check_fits, read_adapter
from exporting.layouts import gguf_architecture, original_layout
from exporting.tensor_files import SafetensorsFolder, TensorSpec, write_gguf, write_safetensors
from generation import DTYPES as GENERATION_DTYPES, missing_component_file, pipeline_folders
from lora import WEIGHT_NAME
from models import MODELS

DTYPES = {**GENERATION_DTYPES, "fp8_e4m3fn": torch.float8_e4m3fn}  # the generation scripts' --dtype, and fp8
GGUF_TYPES = ("F16", "BF16", "Q8_0")
GGUF_KEEP_F32 = 1024  # city96's ComfyUI-GGUF keeps 1-D tensors and tensors of at most this many elements in F32
GGUF_MAX_NAME = 127  # the longest tensor name its loader takes
Q8_0_BLOCK = 32


@dataclass
class Source:
    """The transformer an export reads: its model ("sd3" / "flux"), its folder, an adapter to fuse into it."""
    kind: str
    folder: Path
    adapter: Optional[Adapter] = None
    lora_scale: float = 1.0


def model_kind(transformer_folder):
    """"sd3" or "flux" from the transformer's config.json, or UsageError."""
    config = json.loads((Path(transformer_folder) / "config.json").read_text())
    for kind, spec in MODELS.items():
        if config.get("_class_name") == spec.transformer_class.__name__:
            return kind
    raise UsageError(f"{transformer_folder} holds a {config.get('_class_name')}, not an SD3 or Flux transformer.")


def find_source(checkpoint_path, lora_path=None, lora_scale=1.0):
    """The Source of --checkpoint_path: a pipeline folder (its transformer/), a trainer's checkpoint-N (its
    transformer/), a LoRA run's output or checkpoint-N folder (its adapter fused into the base pipeline the run
    records), or a transformer folder itself; with --lora_path, that adapter fused in at --lora_scale."""
    root = Path(checkpoint_path)
    if not root.is_dir():
        raise UsageError(f"--checkpoint_path {root} does not exist: give a pipeline folder, a trainer's "
                         f"checkpoint-N folder or a transformer folder.")
    if (root / "config.json").is_file() and not (root / "transformer").is_dir():
        folder = root
    else:
        base, folder = pipeline_folders(root)
        folder = folder or base / "transformer"
        if not folder.is_dir() and (root / WEIGHT_NAME).is_file():  # a LoRA run's output or checkpoint-N
            recorded = base_of_adapter(root)
            if lora_path is not None or recorded is None:
                raise UsageError(f"--checkpoint_path {root} holds a LoRA adapter, not a transformer: give the base "
                                 f"pipeline as --checkpoint_path and the adapter as --lora_path.")
            folder, lora_path = Path(recorded) / "transformer", root
    missing = missing_component_file(folder)
    if missing:
        raise UsageError(f"--checkpoint_path {root}: the transformer is incomplete or absent (missing {missing}).")
    source = Source(model_kind(folder), folder, lora_scale=lora_scale)
    if lora_path is not None:
        source.adapter = read_adapter(lora_path)
        check_fits(source.adapter, SafetensorsFolder(folder).shapes)
    return source


#################################################################################
#                         The tensors, made one at a time                       #
#################################################################################

def output_dtype(dtype, source_dtype, shape):
    """--dtype applied to one tensor: None keeps the checkpoint's own; fp8 applies to the 2-D Linear weights only
    (biases, norm scales, embeddings and convolutions keep theirs); non-float tensors are never cast."""
    if dtype is None or not source_dtype.is_floating_point:
        return source_dtype
    if dtype == torch.float8_e4m3fn and len(shape) != 2:
        return source_dtype
    return dtype


class TransformerTensors:
    """The diffusers tensors of a Source, read one at a time, the adapter fused in (W + (s B A), cast to W's dtype,
    as peft's merge does) and cast to --dtype."""

    def __init__(self, source, dtype=None):
        self.reader = SafetensorsFolder(source.folder)
        self.source, self.dtype = source, dtype
        self.shapes = self.reader.shapes

    def out_dtype(self, key):
        return output_dtype(self.dtype, self.reader.dtypes[key], self.shapes[key])

    def read(self, key, cast=True):
        tensor = self.reader.read(key)
        adapter, module = self.source.adapter, key.removesuffix(".weight")
        if adapter is not None and key.endswith(".weight") and module in adapter.modules:
            tensor = tensor + (adapter.delta(module) * self.source.lora_scale).to(tensor.dtype)
        return tensor.to(self.out_dtype(key)) if cast else tensor

    def diffusers_specs(self):
        return [TensorSpec(key, self.out_dtype(key), self.shapes[key], lambda key=key: self.read(key))
                for key in sorted(self.shapes)]

    def original_specs(self, cast=True):
        specs = []
        for tensor in original_layout(self.source.kind, self.shapes):
            first = tensor.parts[0]
            shape = (sum(self.shapes[p][0] for p in tensor.parts), *self.shapes[first][1:])
            dtype = self.out_dtype(first) if cast else self.reader.dtypes[first]
            specs.append(TensorSpec(tensor.name, dtype, shape,
                                    lambda t=tensor, s=shape, d=dtype, cast=cast: self.stacked(t, s, d, cast)))
        return specs

    def stacked(self, tensor, shape, dtype, cast):
        """One original tensor: its diffusers parts stacked by rows (read one at a time into the result), halves
        swapped where the layout says so."""
        if len(tensor.parts) == 1:
            out = self.read(tensor.parts[0], cast)
        else:
            out, row = torch.empty(shape, dtype=dtype), 0
            for part in tensor.parts:
                value = self.read(part, cast)
                out[row:row + len(value)] = value
                row += len(value)
        return torch.cat(out.chunk(2)[::-1]) if tensor.swap_halves else out


#################################################################################
#                                 The formats                                   #
#################################################################################

def gguf_types(specs, quant):
    """{name: GGMLQuantizationType}: 1-D tensors and those of at most GGUF_KEEP_F32 elements in F32; the 2-D Linear
    weights as --quant (Q8_0 only where rows split into 32-element blocks, else F16), the rest (convolutions, SD3's
    positional table) F16. diffusers dequantises Linear weights only, so nothing else may be quantised."""
    import gguf

    kinds = gguf.GGMLQuantizationType
    types = {}
    for spec in specs:
        if len(spec.name) > GGUF_MAX_NAME:
            raise UsageError(f"tensor name {spec.name} is longer than the {GGUF_MAX_NAME} characters GGUF loaders take.")
        size = 1
        for n in spec.shape:
            size *= n
        if len(spec.shape) <= 1 or size <= GGUF_KEEP_F32:
            types[spec.name] = kinds.F32
        elif len(spec.shape) == 2 and spec.name.endswith(".weight"):
            q8_ok = quant != "Q8_0" or spec.shape[-1] % Q8_0_BLOCK == 0
            types[spec.name] = kinds[quant] if q8_ok else kinds.F16
        else:
            types[spec.name] = kinds.F16
    return types


def default_quant(tensors):
    """--quant's default: BF16 for a checkpoint mostly in bf16, else F16 (as city96's converter chooses)."""
    counts = {}
    for key, dtype in tensors.reader.dtypes.items():
        counts[dtype] = counts.get(dtype, 0) + 1
    return "BF16" if max(counts, key=counts.get) == torch.bfloat16 else "F16"


def export_transformer(source, fmt, out, dtype=None, quant=None):
    """Write `source`'s transformer to `out` in format `fmt` ("original", "diffusers" or "gguf"); returns
    {"tensors": count, "file": path}."""
    import gguf

    tensors = TransformerTensors(source, dtype)
    metadata = {"format": "pt", "diffusion4k.layout": fmt}
    if fmt == "diffusers":
        specs = tensors.diffusers_specs()
        write_safetensors(out, specs, metadata)
    elif fmt == "original":
        specs = tensors.original_specs()
        write_safetensors(out, specs, metadata)
    else:
        quant = quant or default_quant(tensors)
        specs = tensors.original_specs(cast=False)
        file_type = {"F16": gguf.LlamaFileType.MOSTLY_F16, "BF16": gguf.LlamaFileType.MOSTLY_BF16,
                     "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant]
        write_gguf(out, gguf_architecture(source.kind), specs, gguf_types(specs, quant), file_type)
    return {"tensors": len(specs), "file": str(out)}
