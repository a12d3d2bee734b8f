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
    "SD3Transformer2DModel": ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k", "attn.to_out.0",
            "attn.to_q", "attn.to_v"),
    "FluxTransformer2DModel": ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
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


def lora_config(transformer, rank, alpha=None, layers=None, dropout=0.0):
    """peft LoraConfig for `transformer` (an instance or class): rank r, alpha (default r, as diffusers' trainers),
    target modules (default: DEFAULT_LORA_LAYERS of its class), Gaussian A and zero B (diffusers' trainers' init)."""
    if rank < 1:
        raise UsageError(f"--lora_rank {rank}: a LoRA adapter needs a rank of at least 1 (0 means full fine-tuning).")
    alpha = rank if alpha is None else alpha
    if alpha <= 0:
        raise UsageError(f"--lora_alpha {alpha} must be positive (the update is scaled by alpha / rank).")
    if not 0.0 <= dropout < 1.0:
        raise UsageError(f"--lora_dropout {dropout} must be in [0, 1).")
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian",
                      target_modules=list(layers or default_lora_layers(transformer)))


def default_lora_layers(transformer):
    """diffusers' trainers' default target modules for this transformer class."""
    name = transformer.__name__ if isinstance(transformer, type) else type(transformer).__name__
    if name not in DEFAULT_LORA_LAYERS:
        raise UsageError(f"No default LoRA target modules for {name}: pass --lora_layers.")
    return DEFAULT_LORA_LAYERS[name]


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


#################################################################################
#                         Training with an adapter                              #
#################################################################################

def add_training_flags(parser):
    """The trainers' LoRA flags, named as diffusers' LoRA trainers name them (their --rank is --lora_rank here)."""
    parser.add_argument("--lora_rank", type=int, default=0,
                        help="rank of a LoRA adapter (peft) on the transformer; 0: full fine-tuning (the paper)")
    parser.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    parser.add_argument("--lora_layers", type=parse_lora_layers, default=None,
                        help='comma-separated target modules, e.g. "attn.to_q,attn.to_k" (default: diffusers\' '
                             'LoRA trainers\' choice per model)')
    parser.add_argument("--lora_dropout", type=float, default=0.0)
    parser.add_argument("--merge_lora", action="store_true",
                        help="also write OUTPUT_DIR as a complete pipeline with the adapter merged into the weights")


def check_training_flags(args, transformer_class, model_dir):
    """Refuse LoRA flags without --lora_rank, and a rank whose targets miss this transformer, before anything runs.
    The check builds the transformer on the meta device from its config: no weights are read."""
    if args.lora_rank < 0:
        raise UsageError(f"--lora_rank {args.lora_rank}: give 0 (full fine-tuning) or a positive rank.")
    if not args.lora_rank:
        given = [flag for flag, value in (("--lora_alpha", args.lora_alpha), ("--lora_layers", args.lora_layers),
                                          ("--lora_dropout", args.lora_dropout), ("--merge_lora", args.merge_lora))
                 if value]
        if given:
            raise UsageError(f"{', '.join(given)} only apply to LoRA: add --lora_rank (e.g. 16), or drop them for full "
                             f"fine-tuning.")
        return None
    from accelerate import init_empty_weights

    with init_empty_weights():
        skeleton = transformer_class.from_config(transformer_class.load_config(model_dir, subfolder="transformer"))
    config = lora_config(skeleton, args.lora_rank, args.lora_alpha, args.lora_layers, args.lora_dropout)
    check_targets(skeleton, sorted(config.target_modules))
    return config


def attach_for_training(transformer, config, trainable_dtype=None):
    """Attach the adapter; the frozen base keeps its dtype, the adapter's weights get `trainable_dtype` (fp32 for
    plain accelerate, as diffusers' trainers cast them; None under DeepSpeed, which keeps its own fp32 copy)."""
    add_lora(transformer, config)
    if trainable_dtype is not None:
        from diffusers.training_utils import cast_training_params

        cast_training_params(transformer, dtype=trainable_dtype)
    return [param for param in transformer.parameters() if param.requires_grad]


def register_checkpoint_hooks(accelerator, pipeline_class):
    """Make every accelerate checkpoint of a LoRA run hold the adapter as pytorch_lora_weights.safetensors.

    Without DeepSpeed the adapter is all accelerate keeps of the model (not the frozen base), and loading a
    checkpoint puts the adapter's weights back exactly. Under DeepSpeed its engine saves and restores the module
    and the optimizer itself; the adapter file is written beside them.
    """
    def save_hook(models, weights, output_dir):
        transformer = accelerator.unwrap_model(models[0])
        if accelerator.is_main_process:
            save_lora(pipeline_class, transformer, output_dir)
        if weights:
            weights.pop()  # accelerate then writes no full copy of the frozen model

    def load_hook(models, input_dir):
        if not models:  # DeepSpeed: the engine has loaded the module already
            return
        transformer = accelerator.unwrap_model(models.pop())
        load_adapter_weights(transformer, Path(input_dir) / WEIGHT_NAME)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def load_adapter_weights(transformer, path):
    """Put the adapter weights of a file written by `save_lora` into the attached adapter, in place and exactly."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = {key[len("transformer."):]: value for key, value in load_file(path).items()
             if key.startswith("transformer.")}
    result = set_peft_model_state_dict(transformer, state, adapter_name=ADAPTER_NAME)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise UsageError(f"{path} does not match this run's adapter (unexpected {unexpected[:3]}): resume with the "
                         f"--lora_rank and --lora_layers of the run that wrote it.")


def merged_transformer(transformer):
    """The transformer with the adapter added into its weights and the adapter layers removed (diffusers' fuse +
    unload), as plain Linear layers again: the fine-tuned model a stock pipeline loads without peft."""
    transformer.fuse_lora(lora_scale=1.0, adapter_names=[ADAPTER_NAME])
    transformer.unload_lora()
    return transformer


def save_adapter(accelerator, transformer, pipeline_class, output_dir):
    """OUTPUT_DIR/pytorch_lora_weights.safetensors from the main process (ZeRO-2 keeps whole weights on each)."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        return save_lora(pipeline_class, accelerator.unwrap_model(transformer), output_dir)


#################################################################################
#                         Generating with an adapter                            #
#################################################################################

def add_generation_flags(parser):
    """--lora_path / --lora_scale of every generating script."""
    parser.add_argument("--lora_path", default=None,
                        help=f"a LoRA adapter: a .safetensors file, or a folder holding {WEIGHT_NAME} (a LoRA run's "
                             f"output or checkpoint-N folder)")
    parser.add_argument("--lora_scale", type=float, default=1.0, help="weight of the adapter (1: as trained)")


def generation_settings(lora_path, lora_scale):
    """What identifies the adapter in image metadata: its file, its sha256 (a retrained file at the same path is
    another adapter) and the scale; all None without one."""
    if lora_path is None:
        return {"lora_path": None, "lora_sha256": None, "lora_scale": None}
    import hashlib

    path = adapter_file(lora_path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return {"lora_path": str(path.resolve()), "lora_sha256": digest.hexdigest(), "lora_scale": lora_scale}
