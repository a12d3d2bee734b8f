"""Where each diffusers tensor goes in the single-file layouts other tools read, written out here as data.

Transformers: Stability AI's SD3 layout (`joint_blocks.N.x_block.attn.qkv`, `x_embedder.proj`, ...) and Black Forest
Labs' Flux layout (`double_blocks.N.img_attn.qkv`, `single_blocks.N.linear1`, `img_in`, ...), the layouts ComfyUI,
Forge and kohya's sd-scripts load. One original tensor is the concatenation (along rows) of one or more diffusers
tensors, q/k/v in that order; the final AdaLN projection (and SD3's last, context-only block) stores (shift, scale)
where diffusers stores (scale, shift). VAE: the LDM layout (`encoder.down.N.block.M`, `mid.attn_1`, ...) of the
original Stable Diffusion and FLUX.1 `ae.safetensors` files.
"""
import re
from dataclasses import dataclass

from errors import UsageError


@dataclass(frozen=True)
class OriginalTensor:
    """One tensor of the original layout: `name`, the diffusers tensors whose rows it stacks, in order (`parts`),
    and whether its two halves swap (diffusers' (scale, shift) -> the original's (shift, scale))."""
    name: str
    parts: tuple
    swap_halves: bool = False


# (original module or tensor, diffusers module(s) or tensor, swap): a module name stands for its ".weight" and
# ".bias"; a name ending in ".scale" / ".weight" / a bare tensor name is one tensor. "last" swaps only in a block
# without its own context output (SD3's final, context_pre_only block).
SD3_GLOBAL = [
    ("pos_embed", "pos_embed.pos_embed"),
    ("x_embedder.proj", "pos_embed.proj"),
    ("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
    ("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
    ("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
    ("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
    ("context_embedder", "context_embedder"),
    ("final_layer.linear", "proj_out"),
    ("final_layer.adaLN_modulation.1", "norm_out.linear", True),
]
SD3_BLOCK = [  # joint_blocks.N. <- transformer_blocks.N.
    ("x_block.attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
    ("x_block.attn.proj", "attn.to_out.0"),
    ("x_block.attn.ln_q.weight", "attn.norm_q.weight"),  # SD3.5: RMS q/k norms
    ("x_block.attn.ln_k.weight", "attn.norm_k.weight"),
    ("x_block.attn2.qkv", ("attn2.to_q", "attn2.to_k", "attn2.to_v")),  # SD3.5 medium: a second self-attention
    ("x_block.attn2.proj", "attn2.to_out.0"),
    ("x_block.attn2.ln_q.weight", "attn2.norm_q.weight"),
    ("x_block.attn2.ln_k.weight", "attn2.norm_k.weight"),
    ("x_block.adaLN_modulation.1", "norm1.linear"),
    ("x_block.mlp.fc1", "ff.net.0.proj"),
    ("x_block.mlp.fc2", "ff.net.2"),
    ("context_block.attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    ("context_block.attn.proj", "attn.to_add_out"),
    ("context_block.attn.ln_q.weight", "attn.norm_added_q.weight"),
    ("context_block.attn.ln_k.weight", "attn.norm_added_k.weight"),
    ("context_block.adaLN_modulation.1", "norm1_context.linear", "last"),
    ("context_block.mlp.fc1", "ff_context.net.0.proj"),
    ("context_block.mlp.fc2", "ff_context.net.2"),
]
FLUX_GLOBAL = [
    ("img_in", "x_embedder"),
    ("txt_in", "context_embedder"),
    ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
    ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
    ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
    ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),  # FLUX.1-dev's guidance embedding
    ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
    ("final_layer.linear", "proj_out"),
    ("final_layer.adaLN_modulation.1", "norm_out.linear", True),
]
FLUX_DOUBLE = [  # double_blocks.N. <- transformer_blocks.N.
    ("img_mod.lin", "norm1.linear"),
    ("img_attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
    ("img_attn.norm.query_norm.scale", "attn.norm_q.weight"),
    ("img_attn.norm.key_norm.scale", "attn.norm_k.weight"),
    ("img_attn.proj", "attn.to_out.0"),
    ("img_mlp.0", "ff.net.0.proj"),
    ("img_mlp.2", "ff.net.2"),
    ("txt_mod.lin", "norm1_context.linear"),
    ("txt_attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    ("txt_attn.norm.query_norm.scale", "attn.norm_added_q.weight"),
    ("txt_attn.norm.key_norm.scale", "attn.norm_added_k.weight"),
    ("txt_attn.proj", "attn.to_add_out"),
    ("txt_mlp.0", "ff_context.net.0.proj"),
    ("txt_mlp.2", "ff_context.net.2"),
]
FLUX_SINGLE = [  # single_blocks.N. <- single_transformer_blocks.N.
    ("modulation.lin", "norm.linear"),
    ("linear1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")),
    ("norm.query_norm.scale", "attn.norm_q.weight"),
    ("norm.key_norm.scale", "attn.norm_k.weight"),
    ("linear2", "proj_out"),
]
# model -> (global table, [(diffusers block prefix, original block prefix, block table)], GGUF architecture name)
LAYOUTS = {
    "sd3": (SD3_GLOBAL, [("transformer_blocks", "joint_blocks", SD3_BLOCK)], "sd3"),
    "flux": (FLUX_GLOBAL, [("transformer_blocks", "double_blocks", FLUX_DOUBLE),
                           ("single_transformer_blocks", "single_blocks", FLUX_SINGLE)], "flux"),
}
TENSOR_SUFFIXES = (".weight", ".scale")  # an entry naming one tensor, not a module


def _expand(original, parts, swap, keys):
    """The OriginalTensors of one table entry whose diffusers tensors exist in `keys` (a module: weight and bias)."""
    parts = (parts,) if isinstance(parts, str) else tuple(parts)
    one_tensor = original.endswith(TENSOR_SUFFIXES) or all(p in keys for p in parts)
    pairs = [(original, parts)] if one_tensor else [(original + end, tuple(p + end for p in parts))
                                                    for end in (".weight", ".bias")]
    found = []
    for name, sources in pairs:
        present = [s in keys for s in sources]
        if all(present):
            found.append(OriginalTensor(name, sources, swap))
        elif any(present):
            missing = [s for s, p in zip(sources, present) if not p]
            raise UsageError(f"the checkpoint has {sources[present.index(True)]} but not {', '.join(missing)}, "
                             f"which {name} needs: it is incomplete or not a stock diffusers transformer.")
    return found


def original_layout(kind, keys):
    """[OriginalTensor] of the original single-file layout of a `kind` ("sd3" / "flux") transformer whose diffusers
    state-dict keys are `keys`. Every diffusers tensor lands in exactly one original tensor, or UsageError."""
    global_table, block_tables, _ = LAYOUTS[kind]
    keys = set(keys)
    layout = []
    for original, parts, *swap in global_table:
        layout += _expand(original, parts, bool(swap), keys)
    for diffusers_prefix, original_prefix, table in block_tables:
        blocks = sorted({int(k.split(".")[1]) for k in keys if k.startswith(diffusers_prefix + ".")})
        for n in blocks:
            src, dst = f"{diffusers_prefix}.{n}.", f"{original_prefix}.{n}."
            block_keys = {k[len(src):] for k in keys if k.startswith(src)}
            context_only = "attn.to_add_out.weight" not in block_keys
            for original, parts, *swap in table:
                swap = bool(swap) and (swap[0] is True or (swap[0] == "last" and context_only))
                parts = (parts,) if isinstance(parts, str) else parts
                layout += [OriginalTensor(dst + t.name, tuple(src + p for p in t.parts), t.swap_halves)
                           for t in _expand(original, parts, swap, block_keys)]
    used = [p for t in layout for p in t.parts]
    unplaced = sorted(keys - set(used))
    if unplaced:
        raise UsageError(f"{len(unplaced)} tensor(s) of this {kind} transformer have no place in the original layout "
                         f"(first: {unplaced[0]}): export it with --format diffusers instead.")
    return layout


def gguf_architecture(kind):
    """`general.architecture` of a GGUF file of this model, as city96's ComfyUI-GGUF names it."""
    return LAYOUTS[kind][2]


#################################################################################
#                    LoRA modules: a diffusers module in the original           #
#################################################################################

@dataclass(frozen=True)
class OriginalModule:
    """Where a diffusers Linear layer sits in the original layout: the original module and the layer's place among
    the diffusers layers whose output rows it stacks (`parts`, in row order)."""
    name: str
    parts: tuple

    def index(self, module):
        return self.parts.index(module)


def original_modules(kind, keys):
    """{diffusers Linear module: OriginalModule} of a transformer whose diffusers state-dict keys are `keys`."""
    modules = {}
    for tensor in original_layout(kind, keys):
        if tensor.name.endswith(".weight") and all(p.endswith(".weight") for p in tensor.parts):
            target = OriginalModule(tensor.name[:-len(".weight")], tuple(p[:-len(".weight")] for p in tensor.parts))
            modules.update({part: target for part in target.parts})
    return modules


#################################################################################
#                                 The VAE                                       #
#################################################################################

LDM_RESNET = {"conv_shortcut": "nin_shortcut"}
LDM_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def ldm_vae_name(key, up_blocks):
    """The LDM name of a diffusers AutoencoderKL tensor (`up_blocks`: the decoder's number of up blocks, which the
    LDM layout numbers from the bottom), or UsageError for a tensor the layout has no place for."""
    rules = [
        (r"(encoder|decoder)\.(conv_in|conv_out)\.(weight|bias)$", lambda m: m.group(0)),
        (r"(quant_conv|post_quant_conv)\.(weight|bias)$", lambda m: m.group(0)),
        (r"(encoder|decoder)\.conv_norm_out\.(weight|bias)$", lambda m: f"{m[1]}.norm_out.{m[2]}"),
        (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(weight|bias)$",
         lambda m: f"encoder.down.{m[1]}.block.{m[2]}.{LDM_RESNET.get(m[3], m[3])}.{m[4]}"),
        (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)$",
         lambda m: f"encoder.down.{m[1]}.downsample.conv.{m[2]}"),
        (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(weight|bias)$",
         lambda m: f"decoder.up.{up_blocks - 1 - int(m[1])}.block.{m[2]}.{LDM_RESNET.get(m[3], m[3])}.{m[4]}"),
        (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)$",
         lambda m: f"decoder.up.{up_blocks - 1 - int(m[1])}.upsample.conv.{m[2]}"),
        (r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(\w+)\.(weight|bias)$",
         lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}.{LDM_RESNET.get(m[3], m[3])}.{m[4]}"),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)$",
         lambda m: f"{m[1]}.mid.attn_1.{LDM_ATTENTION[m[2]]}.{m[3]}"),
    ]
    for pattern, name in rules:
        match = re.match(pattern, key)
        if match:
            return name(match)
    raise UsageError(f"the VAE tensor {key} has no place in the LDM layout ComfyUI reads: is this a stock "
                     f"SD3 / Flux AutoencoderKL?")


def ldm_vae_shape(name, shape):
    """The LDM shape: the mid-block attention's linear layers are 1x1 convolutions there."""
    if re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", name) and len(shape) == 2:
        return (*shape, 1, 1)
    return tuple(shape)
