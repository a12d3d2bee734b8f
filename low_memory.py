"""Low-memory generation: thin uses of diffusers (offload hooks, layerwise casting, VAE tiling, regional
torch.compile) and of torchao through diffusers' quantisation support, each chosen by one flag.

    --cpu_offload none | model | sequential | group   where the weights live between uses (GPU memory vs speed)
    --layerwise_casting none | fp8_e4m3 | fp8_e5m2    transformer weights stored in fp8, each layer computed in --dtype
    --quantize none | int8wo | float8wo | float8dq    transformer weights quantised by torchao when loaded
    --vae_tiling                                       the F=16 VAE decodes tile by tile (diffusers' blended tiles)
    --compile                                          torch.compile of the transformer's repeated blocks
"""
from dataclasses import asdict, dataclass

import torch
from diffusers import PipelineQuantizationConfig, TorchAoConfig

from errors import UsageError

OFFLOADS = ("none", "model", "sequential", "group")
LAYERWISE_CASTING = {"none": None, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
# torchao configs by diffusers' short names: int8 weights (any device), fp8 weights, fp8 weights and activations
# (both need a GPU with fp8 support: compute capability 8.9, i.e. Ada or Hopper).
QUANTIZE = ("none", "int8wo", "float8wo", "float8dq")
FP8_QUANTIZE = ("float8wo", "float8dq")
GROUP_OFFLOAD_BLOCKS = 1  # transformer blocks moved to the GPU at a time by --cpu_offload group


@dataclass(frozen=True)
class LowMemory:
    """One run's memory savings, the flags of the same names (none by default)."""
    cpu_offload: str = "none"
    layerwise_casting: str = "none"
    quantize: str = "none"
    vae_tiling: bool = False
    compile: bool = False

    @classmethod
    def from_args(cls, args):
        """The settings of parsed flags (add_generation_flags)."""
        return cls(args.cpu_offload, args.layerwise_casting, args.quantize, args.vae_tiling, args.compile)

    def settings(self, changes_images=False):
        """The settings as image metadata; changes_images: only those that change the pixels (not --cpu_offload,
        which moves the same numbers), as the settings an eval folder may not mix."""
        return {k: v for k, v in asdict(self).items() if not (changes_images and k == "cpu_offload")}


def torchao_config(name):
    """The torchao AOBaseConfig of a --quantize name (imported here: torchao is needed only when it is used)."""
    try:
        from torchao import quantization as ao
    except ImportError as error:
        raise UsageError(f"--quantize {name} needs torchao (`pip install torchao`, see requirements.txt).") from error
    configs = {"int8wo": ao.Int8WeightOnlyConfig, "float8wo": ao.Float8WeightOnlyConfig,
               "float8dq": ao.Float8DynamicActivationFloat8WeightConfig}
    return configs[name]()


def check_low_memory(device, cpu_offload="none", layerwise_casting="none", quantize="none", compile=False):
    """Raise UsageError, naming the flag, for a choice `device` cannot run or that contradicts another one."""
    for flag, value, choices in (("--cpu_offload", cpu_offload, OFFLOADS),
                                 ("--layerwise_casting", layerwise_casting, tuple(LAYERWISE_CASTING)),
                                 ("--quantize", quantize, QUANTIZE)):
        if value not in choices:
            raise UsageError(f"Unknown {flag} {value!r}: choose one of {', '.join(choices)}.")
    device = torch.device(device)
    if quantize in FP8_QUANTIZE:
        if device.type != "cuda":
            raise UsageError(f"--quantize {quantize} needs a CUDA GPU with fp8 support (Ada or Hopper); on the CPU "
                             f"use --quantize int8wo or --layerwise_casting fp8_e4m3.")
        if torch.cuda.get_device_capability(device) < (8, 9):
            raise UsageError(f"--quantize {quantize} needs fp8 support (compute capability 8.9 or higher); "
                             f"{torch.cuda.get_device_name(device)} has {torch.cuda.get_device_capability(device)}. "
                             f"Use --quantize int8wo or --layerwise_casting fp8_e4m3.")
    if quantize != "none" and layerwise_casting != "none":
        raise UsageError("--quantize and --layerwise_casting both choose how the transformer's weights are stored: "
                         "use one of them.")
    if compile and cpu_offload == "sequential":
        raise UsageError("--compile cannot trace --cpu_offload sequential (weights move on every call): use "
                         "--cpu_offload model or group with --compile.")


def quantization_config(quantize):
    """diffusers' PipelineQuantizationConfig that quantises the transformer with torchao at from_pretrained, or
    None for --quantize none."""
    if quantize == "none":
        return None
    return PipelineQuantizationConfig(quant_mapping={"transformer": TorchAoConfig(torchao_config(quantize))})


def apply_low_memory(pipe, device, cpu_offload="none", layerwise_casting="none", vae_tiling=False, compile=False):
    """Put a loaded pipeline on `device` with the chosen memory savings; returns the pipeline.

    Order matters: storage dtypes first, then where the weights live (offload hooks or `.to(device)`), then compile,
    which traces the layers as they will run.
    """
    device = torch.device(device)
    if layerwise_casting != "none":
        compute_dtype = pipe.transformer.dtype
        pipe.transformer.enable_layerwise_casting(storage_dtype=LAYERWISE_CASTING[layerwise_casting],
                                                  compute_dtype=compute_dtype)
    if vae_tiling:
        pipe.vae.enable_tiling()
    if cpu_offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif cpu_offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    elif cpu_offload == "group":
        enable_group_offload(pipe, device)
    else:
        pipe.to(device)
    if compile:
        compile_transformer(pipe.transformer)
    return pipe


def enable_group_offload(pipe, device):
    """diffusers' group offloading: the transformer moves to `device` a block at a time, every other component as
    one group per leaf module; with CUDA the next group is copied on a side stream while the current one runs."""
    cuda = torch.device(device).type == "cuda"
    pipe.transformer.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"),
                                          offload_type="block_level", num_blocks_per_group=GROUP_OFFLOAD_BLOCKS,
                                          use_stream=cuda)
    from diffusers.hooks import apply_group_offloading

    for name, component in pipe.components.items():
        if name != "transformer" and isinstance(component, torch.nn.Module):
            apply_group_offloading(component, onload_device=device, offload_device=torch.device("cpu"),
                                   offload_type="leaf_level", use_stream=cuda)


def compile_transformer(transformer):
    """torch.compile of the transformer's repeated blocks (diffusers' regional compilation: the same kernels as
    compiling the whole model, in a fraction of the compile time), or of the whole model if it lists none."""
    if getattr(transformer, "_repeated_blocks", None):
        transformer.compile_repeated_blocks(fullgraph=True)
    else:
        transformer.compile(fullgraph=True)
    return transformer


def add_generation_flags(parser):
    """The flags of every generating script (test_sd3.py, test_flux.py, generate_and_eval_fid.py)."""
    parser.add_argument("--cpu_offload", choices=OFFLOADS, default="none",
                        help="model: one model on the GPU at a time; group: the transformer a block at a time, the "
                             "next one copied on a side stream; sequential: layer by layer (slowest, least memory)")
    parser.add_argument("--layerwise_casting", choices=tuple(LAYERWISE_CASTING), default="none",
                        help="store the transformer's weights in fp8, compute each layer in --dtype (diffusers)")
    parser.add_argument("--quantize", choices=QUANTIZE, default="none",
                        help="quantise the transformer's weights with torchao when loading: int8 weights (any "
                             "device), fp8 weights / fp8 weights and activations (GPUs with fp8: Ada, Hopper)")
    parser.add_argument("--vae_tiling", action="store_true",
                        help="decode in overlapping tiles blended at the seams (diffusers; not the same image)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the transformer's repeated blocks")
