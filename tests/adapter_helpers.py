"""Adapters for the export tests, made as the trainers make them, and diffusers' own reading of them (the stock
pipelines' load_lora_weights, which reads the header's alpha and converts kohya files; peft's merge)."""
import inspect

import torch
from peft.tuners.lora import LoraLayer

import lora
from models import MODELS


def kind_of(transformer):
    return next(kind for kind, spec in MODELS.items() if isinstance(transformer, spec.transformer_class))


def random_adapter(transformer, folder, rank=4, alpha=7.0, seed=1, layers=None):
    """Attach a LoRA (alpha != rank by default) with random A and B to `transformer` and save it as the trainers do
    (lora.save_lora); returns the file."""
    lora.add_lora(transformer, lora.lora_config(transformer, rank, alpha, layers))
    g = torch.Generator().manual_seed(seed)
    for name, param in transformer.named_parameters():
        if "lora_" in name:
            param.data = (0.1 * torch.randn(param.shape, generator=g)).to(param.dtype)
    return lora.save_lora(MODELS[kind_of(transformer)].pipeline_class, transformer, folder)


def pipeline_with(transformer):
    """The stock pipeline of `transformer`'s model holding that transformer and nothing else."""
    cls = MODELS[kind_of(transformer)].pipeline_class
    names = [n for n in inspect.signature(cls.__init__).parameters if n != "self"]
    return cls(**{n: transformer if n == "transformer" else None for n in names})


def load_with_diffusers(transformer, adapter_file, name="x"):
    """Load `adapter_file` into `transformer` as a user's pipeline does (load_lora_weights)."""
    pipeline_with(transformer).load_lora_weights(str(adapter_file), adapter_name=name)
    return transformer


def diffusers_deltas(transformer, adapter_file, name="x"):
    """{module: what fusing the adapter adds to its weight} (peft's get_delta_weight, the update fuse_lora adds), the
    adapter loaded by the stock pipeline's load_lora_weights; the adapter is removed again afterwards."""
    load_with_diffusers(transformer, adapter_file, name)
    deltas = {module: layer.get_delta_weight(name).float() for module, layer in transformer.named_modules()
              if isinstance(layer, LoraLayer) and name in layer.lora_A}
    transformer.delete_adapters(name)
    return deltas


def diffusers_fused(transformer, adapter_file, scale=1.0, name="x"):
    """The state dict of `transformer` with the adapter loaded by load_lora_weights and fused by fuse_lora."""
    pipe = pipeline_with(transformer)
    pipe.load_lora_weights(str(adapter_file), adapter_name=name)
    pipe.fuse_lora(lora_scale=scale, adapter_names=[name])
    pipe.unload_lora_weights()
    return transformer.state_dict()
