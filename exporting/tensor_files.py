"""Reading and writing tensor files one tensor at a time, so that exporting a model needs the memory of its largest
tensor, not of the model (a 12 B Flux has 24 GB of bf16 weights).

`safetensors.torch.save_file` and `gguf.GGUFWriter.add_tensor` hold every tensor until the file is written, and
`safe_open` maps whole shards into the process. Here a file's header is written first, from the names, dtypes and
shapes alone; then each tensor is made, written and dropped. Reading seeks to one tensor and reads its bytes.

The safetensors format: an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}
(offsets into the data that follows, contiguous, in the order written) with an optional "__metadata__" of strings,
then the data.
"""
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from errors import UsageError
from outputs import atomic_path

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPE_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
SINGLE_NAME = "diffusion_pytorch_model.safetensors"


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to write: its name, dtype and shape (known before any data is read) and how to make it."""
    name: str
    dtype: torch.dtype
    shape: tuple
    make: Callable[[], torch.Tensor]


#################################################################################
#                                  Reading                                      #
#################################################################################

def read_safetensors_header(path):
    """(header without "__metadata__", metadata dict, where the data starts) of a safetensors file, reading only its
    header."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            length = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(length))
    except (OSError, struct.error, ValueError) as error:
        raise UsageError(f"{path} is not a readable safetensors file ({error}).") from None
    metadata = header.pop("__metadata__", None) or {}
    return header, metadata, 8 + length


class SafetensorsFolder:
    """The tensors of a diffusers model folder (one safetensors file or shards with their index), read one at a time:
    `shapes` and `dtypes` come from the headers, `read(name)` reads one tensor's bytes."""

    def __init__(self, folder):
        folder = Path(folder)
        index = folder / INDEX_NAME
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (folder / SINGLE_NAME).is_file():
            files = [SINGLE_NAME]
        else:
            raise UsageError(f"{folder} holds no {SINGLE_NAME} (or its shards and {INDEX_NAME}): export.py reads "
                             f"safetensors weights; re-save the model with save_pretrained(safe_serialization=True).")
        self.entries = {}  # name -> (file, data start, header entry)
        for name in files:
            path = folder / name
            header, _, start = read_safetensors_header(path)
            self.entries.update({key: (path, start, entry) for key, entry in header.items()})
        self.shapes = {key: tuple(e["shape"]) for key, (_, _, e) in self.entries.items()}
        self.dtypes = {key: SAFETENSORS_DTYPES[e["dtype"]] for key, (_, _, e) in self.entries.items()}

    def read(self, name):
        """The tensor `name`, read from its shard into memory of its own."""
        path, start, entry = self.entries[name]
        begin, end = entry["data_offsets"]
        buffer = bytearray(end - begin)
        with open(path, "rb") as f:
            f.seek(start + begin)
            if f.readinto(buffer) != len(buffer):
                raise UsageError(f"{path} ends inside tensor {name}: the file is truncated; download or save it again.")
        dtype = self.dtypes[name]
        if not buffer:
            return torch.empty(self.shapes[name], dtype=dtype)
        return torch.frombuffer(buffer, dtype=torch.uint8).view(dtype).reshape(self.shapes[name])


#################################################################################
#                                  Writing                                      #
#################################################################################

def nbytes(dtype, shape):
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def as_bytes(tensor):
    """The little-endian bytes of a tensor as a numpy uint8 view (no copy for a contiguous tensor)."""
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy()


def checked(spec, tensor):
    """`tensor`, after checking that it is what the header announced."""
    if tensor.dtype != spec.dtype or tuple(tensor.shape) != tuple(spec.shape):
        raise RuntimeError(f"{spec.name}: made {tensor.dtype} {tuple(tensor.shape)}, announced {spec.dtype} "
                           f"{tuple(spec.shape)}")
    return tensor


def write_safetensors(path, specs, metadata=None):
    """Write `specs` (TensorSpecs, in order) to a safetensors file: the header first, then each tensor as it is made.
    Atomic: a failed export leaves no file. Returns the path."""
    header, offset = {}, 0
    for spec in specs:
        size = nbytes(spec.dtype, spec.shape)
        header[spec.name] = {"dtype": DTYPE_CODES[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for spec in specs:
                f.write(as_bytes(checked(spec, spec.make())))
    return Path(path)


def quantized(tensor, qtype, rows_at_once=256):
    """`tensor` as the bytes of GGML type `qtype` (numpy), quantised a few rows at a time: the fp32 copy that
    gguf's quantiser needs never exists for the whole tensor."""
    import gguf

    if tensor.dim() < 2:
        return gguf.quants.quantize(tensor.to(torch.float32).numpy(), qtype)
    rows = tensor.reshape(-1, tensor.shape[-1])
    out = None
    for start in range(0, rows.shape[0], rows_at_once):
        chunk = gguf.quants.quantize(rows[start:start + rows_at_once].to(torch.float32).numpy(), qtype)
        if out is None:
            out = np.empty((rows.shape[0], chunk.shape[-1]), dtype=chunk.dtype)
        out[start:start + len(chunk)] = chunk
    return out


def write_gguf(path, architecture, specs, types, file_type):
    """Write `specs` to a GGUF file (`general.architecture` = `architecture`), each tensor stored as
    `types[name]` (a gguf.GGMLQuantizationType): the header and tensor infos first, then each tensor as it is made
    and quantised. Atomic. Returns the path."""
    import gguf

    writer = gguf.GGUFWriter(path=None, arch=architecture)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(file_type)
    for spec in specs:
        block, type_size = gguf.GGML_QUANT_SIZES[types[spec.name]]
        size = math.prod(spec.shape) // block * type_size
        writer.add_tensor_info(spec.name, spec.shape, np.dtype(np.float32), size, raw_dtype=types[spec.name])
    with atomic_path(path) as tmp:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for spec in specs:
            writer.write_tensor_data(quantized(checked(spec, spec.make()), types[spec.name]))
        writer.close()
    return Path(path)
