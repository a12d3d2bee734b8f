"""LoRA with peft: the adapter of each model, attached to its transformer, checked, saved and loaded as diffusers does.

An adapter adds scale * (alpha / r) * B A to the weight W of every targeted Linear layer (A: r x in, B: out x r,
B starting at zero, so training starts from the pretrained model). The file is the one diffusers' LoRA trainers
write (`pytorch_lora_weights.safetensors`, keys `transformer.<module>.lora_A/B.weight`, the peft config in its
metadata) and that `load_lora_weights` of the stock pipeline reads.
"""
import json
from pathlib import Path

import diffusers
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open

from errors import UsageError

WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LoRA trainers' file name
ADAPTER_NAME = "default"  # peft's default adapter name, the one diffusers' trainers train
# Target modules when --lora_layers is not given: those of diffusers' DreamBooth LoRA trainers for each model
# (SD3: the joint attention projections; Flux: attention and both feed-forwards of the double-stream blocks,
# and, by suffix, the attention projections of the single-stream blocks).
DEFAULT_LORA_LAYERS = {
    "sd3": ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k", "attn.to_out.0",
            "attn.to_q", "attn.to_v"),
    "flux": ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
             "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
             "ff_context.net.2"),
}
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector", ".alpha")


#################################################################################
#                           Building and attaching                              #
#################################################################################

def parse_lora_layers(text):
    """`--lora_layers "attn.to_q,attn.to_k"` -> ("attn.to_q", "attn.to_k"); None or "" -> None (the defaults)."""
    if text is None or not text.strip():
        return None
    return tuple(name.strip() for name in text.split(",") if name.strip())


def lora_config(model, rank, alpha=None, layers=None, dropout=0.0):
    """peft LoraConfig of `model` ("sd3" | "flux"): rank r, alpha (default r, as diffusers' trainers), target modules
    (default DEFAULT_LORA_LAYERS[model]), Gaussian A and zero B (diffusers' trainers' `init_lora_weights`)."""
    if rank < 1:
        raise UsageError(f"--lora_rank {rank}: a LoRA adapter needs a rank of at least 1 (0 means full fine-tuning).")
    alpha = rank if alpha is None else alpha
    if alpha <= 0:
        raise UsageError(f"--lora_alpha {alpha} must be positive (the update is scaled by alpha / rank).")
    if not 0.0 <= dropout < 1.0:
        raise UsageError(f"--lora_dropout {dropout} must be in [0, 1).")
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian",
                      target_modules=list(layers or DEFAULT_LORA_LAYERS[model]))


def matches(module_name, target):
    """peft's rule for a target given as a name: the module's full name equals it or ends with '.' + it."""
    return module_name == target or module_name.endswith("." + target)


def check_targets(transformer, targets):
    """Raise UsageError unless every target names at least one Linear layer of `transformer`; returns the names."""
    linear = [name for name, module in transformer.named_modules() if isinstance(module, torch.nn.Linear)]
    targeted, unmatched = [], []
    for target in targets:
        found = [name for name in linear if matches(name, target)]
        (targeted.extend(found) if found else unmatched.append(target))
    if unmatched:
        suffixes = sorted({name.split(".", 2)[-1] for name in linear if "." in name})
        more = ", ..." if len(suffixes) > 12 else ""
        raise UsageError(f"--lora_layers: {', '.join(unmatched)} match(es) no Linear layer of this "
                         f"{type(transformer).__name__}, so the adapter would not train there. Give module names or "
                         f"suffixes such as {', '.join(suffixes[:12])}{more}")
    return sorted(set(targeted))


def add_lora(transformer, config):
    """Check the targets, then attach `config` as peft adapter ADAPTER_NAME (diffusers' `add_adapter`): afterwards
    only the adapter's lora_A / lora_B parameters require gradients. Returns the adapted module names."""
    targeted = check_targets(transformer, sorted(config.target_modules))
    transformer.requires_grad_(False)
    transformer.add_adapter(config, adapter_name=ADAPTER_NAME)
    return targeted


#################################################################################
#                                 Saving                                        #
#################################################################################

def adapter_metadata(transformer):
    """The peft config of the adapter as diffusers stores it in the file (alpha and targets travel with it)."""
    config = transformer.peft_config[ADAPTER_NAME].to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}


def save_lora(pipeline_class, transformer, folder, state_dict=None):
    """Write folder/pytorch_lora_weights.safetensors as diffusers' LoRA trainers do; returns its path.

    state_dict: the transformer's full state dict when the caller has it (accelerate's `get_state_dict` under
    DeepSpeed); otherwise the module's own. Only the adapter's tensors are kept (peft's get_peft_model_state_dict).
    """
    lora_layers = get_peft_model_state_dict(transformer, state_dict=state_dict, adapter_name=ADAPTER_NAME)
    pipeline_class.save_lora_weights(folder, transformer_lora_layers=lora_layers, weight_name=WEIGHT_NAME,
                                     transformer_lora_adapter_metadata=adapter_metadata(transformer))
    return Path(folder) / WEIGHT_NAME


#################################################################################
#                          Checking and loading                                 #
#################################################################################

def adapter_file(lora_path):
    """The adapter file of `--lora_path`: a .safetensors file, or a folder holding pytorch_lora_weights.safetensors
    (a LoRA run's output folder or one of its checkpoint-N folders)."""
    path = Path(lora_path)
    if path.is_dir():
        path = path / WEIGHT_NAME
        if not path.is_file():
            raise UsageError(f"--lora_path {lora_path}: the folder holds no {WEIGHT_NAME}. Give the output folder or "
                             f"a checkpoint-N folder of a LoRA run (--lora_rank > 0), or the .safetensors file.")
    elif not path.is_file():
        raise UsageError(f"--lora_path {lora_path} does not exist.")
    elif path.suffix != ".safetensors":
        raise UsageError(f"--lora_path {lora_path}: expected a .safetensors adapter file or a folder holding one.")
    return path


def read_adapter_shapes(path):
    """{key: shape} of the tensors in an adapter file, without reading the tensors."""
    try:
        with safe_open(str(path), "pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as error:  # safetensors raises its own error types for a file that is not safetensors
        raise UsageError(f"--lora_path {path} is not a readable safetensors file ({error}).") from None


def check_adapter(transformer, path):
    """Raise UsageError unless the adapter at `path` adapts modules that `transformer` has, with its shapes.

    Returns the number of adapted modules. An adapter trained for the other model names modules this one lacks
    (Flux's single_transformer_blocks, SD3's deeper blocks) or has other widths, and is refused here, before any
    weight is touched.
    """
    shapes = read_adapter_shapes(path)
    modules = dict(transformer.named_modules())
    kind = type(transformer).__name__
    adapted = set()
    for key, shape in shapes.items():
        if not key.startswith("transformer."):
            continue  # text-encoder adapters: diffusers loads them into the text encoders
        name, suffix = next(((key[len("transformer."):-len(s)], s) for s in LORA_SUFFIXES if key.endswith(s)),
                            (None, None))
        if name is None:
            raise UsageError(f"--lora_path {path}: tensor {key} is not a LoRA weight in diffusers' format.")
        module = modules.get(name)
        if not isinstance(module, torch.nn.Linear):
            raise UsageError(f"--lora_path {path} does not fit this {kind}: it adapts {name}, which this model "
                             f"{'does not have' if module is None else 'has, but not as a Linear layer'}. The adapter "
                             f"was trained for another model (use the script of that model).")
        expected = {".lora_A.weight": (None, module.in_features), ".lora_B.weight": (module.out_features, None)}
        want = expected.get(suffix)
        if want and any(w is not None and w != s for w, s in zip(want, shape)):
            raise UsageError(f"--lora_path {path} does not fit this {kind}: {name} is {module.in_features} -> "
                             f"{module.out_features} here, the adapter's {suffix[1:]} has shape {list(shape)}. The "
                             f"adapter was trained for another model.")
        adapted.add(name)
    if not adapted and not any(key.startswith("text_encoder") for key in shapes):
        raise UsageError(f"--lora_path {path} holds no LoRA weights for the transformer or the text encoders.")
    return len(adapted)


def read_adapter_config(path):
    """The transformer adapter's peft config stored in an adapter file by `save_lora` ({} for files without one)."""
    with safe_open(str(path), "pt") as f:
        text = (f.metadata() or {}).get("lora_adapter_metadata")
    stored = json.loads(text) if text else {}
    return {key[len("transformer."):]: value for key, value in stored.items() if key.startswith("transformer.")}


def load_lora(pipe, lora_path, lora_scale=1.0):
    """Check the adapter at `lora_path`, then load it into the stock pipeline (`load_lora_weights`) and fuse it
    with weight scale * alpha / r (`fuse_lora`), leaving plain Linear layers (`unload_lora_weights`): generation then
    costs what the base model costs, and every low-memory mode applies to the fused weights. Returns the file."""
    path = adapter_file(lora_path)
    check_adapter(pipe.transformer, path)
    verbosity = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()  # not "no LoRA keys for the text encoder" for every adapter
    try:
        pipe.load_lora_weights(str(path), adapter_name="lora")
    finally:
        diffusers.utils.logging.set_verbosity(verbosity)
    pipe.fuse_lora(lora_scale=lora_scale, adapter_names=["lora"])
    pipe.unload_lora_weights()
    return path
