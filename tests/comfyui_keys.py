"""ComfyUI's key maps and LoRA arithmetic, written out for the export tests from comfyanonymous/ComfyUI (GPL-3.0: the
key templates are quoted as facts about the files ComfyUI reads; none of its code is copied or run here):

- comfy/utils.py `MMDIT_MAP_BASIC`, `MMDIT_MAP_BLOCK`, `mmdit_to_diffusers`: SD3's original keys and the diffusers
  key each comes from. q/k/v of "joint_blocks.{}.x_block.attn.qkv.{}" (and of context_block with add_q/k/v_proj)
  are the row slices (0, 0, offset), (0, offset, offset), (0, offset * 2, offset), offset = depth * 64 (the hidden
  size); "joint_blocks.{depth - 1}.context_block.adaLN_modulation.1.{}" and "final_layer.adaLN_modulation.1.{}" go
  through `swap_scale_shift` (halves exchanged).
- comfy/utils.py `flux_to_diffusers`: Flux's original keys; "double_blocks.{}.img_attn.qkv.{}" takes to_q, to_k, to_v
  at (0, 0, hidden_size), (0, hidden_size, hidden_size), (0, hidden_size * 2, hidden_size), txt_attn.qkv the
  add_*_proj likewise; "single_blocks.{}.linear1.{}" also proj_mlp at (0, hidden_size * 3, hidden_size * 4);
  "final_layer.adaLN_modulation.1.{}" through `swap_scale_shift`.
- comfy/model_detection.py `detect_unet_config`: SD3.5's "joint_blocks.0.context_block.attn.ln_q.weight" (q/k RMS
  norms) and "joint_blocks.{}.x_block.attn2.qkv.weight" (the second attention), which mmdit_to_diffusers leaves out.
- comfy/lora.py `model_lora_keys_unet`: "lora_unet_{}" for each weight key of the model (without
  "diffusion_model.", "." -> "_"); for SD3 and Flux also "transformer.{}" for each diffusers weight key of the maps.
- comfy/lora.py `load_lora` with comfy/weight_adapter/lora.py `LoRAAdapter`: "{}.lora_up.weight" / "{}.lora_down.weight"
  or "{}.lora_B.weight" / "{}.lora_A.weight", and "{}.alpha"; weight += strength * (alpha / down.shape[0] if an
  alpha tensor is present, else 1.0) * up @ down, computed in fp32.
- comfy/diffusers_convert.py `vae_conversion_map`, `vae_conversion_map_attn`: the LDM VAE keys.
"""
import re

import torch

ENDS = ("weight", "bias")
QKV = ("to_q", "to_k", "to_v")
ADDED_QKV = ("add_q_proj", "add_k_proj", "add_v_proj")


def stacked(out, src, names, original, hidden, end):
    """The (0, j * hidden, hidden) row slices: diffusers layer src + names[j] in rows j * hidden of `original`."""
    for j, name in enumerate(names):
        out[f"{src}{name}.{end}"] = (f"{original}.{end}", j * hidden, hidden, False)


def sd3_map(blocks, hidden):
    """{diffusers key: (original key, first row, rows or None for all, halves swapped)}, mmdit_to_diffusers and
    model_detection; ComfyUI's `depth - 1` (its last block) is `blocks - 1` here."""
    block_map = [("context_block.adaLN_modulation.1", "norm1_context.linear"),
                 ("context_block.attn.proj", "attn.to_add_out"), ("context_block.mlp.fc1", "ff_context.net.0.proj"),
                 ("context_block.mlp.fc2", "ff_context.net.2"), ("x_block.adaLN_modulation.1", "norm1.linear"),
                 ("x_block.attn.proj", "attn.to_out.0"), ("x_block.mlp.fc1", "ff.net.0.proj"),
                 ("x_block.mlp.fc2", "ff.net.2"),
                 ("x_block.attn2.proj", "attn2.to_out.0")]  # model_detection's attn2 (SD3.5 medium)
    out = {}
    for i in range(blocks):
        src, dst = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        for end in ENDS:
            stacked(out, src + "attn.", QKV, f"{dst}x_block.attn.qkv", hidden, end)
            stacked(out, src + "attn2.", QKV, f"{dst}x_block.attn2.qkv", hidden, end)
            stacked(out, src + "attn.", ADDED_QKV, f"{dst}context_block.attn.qkv", hidden, end)
            for original, diffusers in block_map:
                out[f"{src}{diffusers}.{end}"] = (f"{dst}{original}.{end}", 0, None, False)
        for q, original in (("norm_q", "x_block.attn.ln_q"), ("norm_k", "x_block.attn.ln_k"),
                            ("norm_added_q", "context_block.attn.ln_q"), ("norm_added_k", "context_block.attn.ln_k")):
            out[f"{src}attn.{q}.weight"] = (f"{dst}{original}.weight", 0, None, False)
        for q in ("q", "k"):
            out[f"{src}attn2.norm_{q}.weight"] = (f"{dst}x_block.attn2.ln_{q}.weight", 0, None, False)
    basic = [("context_embedder", "context_embedder"), ("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
             ("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"), ("x_embedder.proj", "pos_embed.proj"),
             ("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
             ("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"), ("final_layer.linear", "proj_out")]
    for end in ENDS:
        out.update({f"{d}.{end}": (f"{o}.{end}", 0, None, False) for o, d in basic})
        out[f"norm_out.linear.{end}"] = (f"final_layer.adaLN_modulation.1.{end}", 0, None, True)
        last = f"transformer_blocks.{blocks - 1}.norm1_context.linear.{end}"
        out[last] = (f"joint_blocks.{blocks - 1}.context_block.adaLN_modulation.1.{end}", 0, None, True)
    out["pos_embed.pos_embed"] = ("pos_embed", 0, None, False)
    return out


def flux_map(double_blocks, single_blocks, hidden):
    """{diffusers key: (original key, first row, rows or None for all, halves swapped)}, flux_to_diffusers."""
    block_map = {"attn.to_out.0": "img_attn.proj", "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
                 "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
                 "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2"}
    norms = {"attn.norm_q.weight": "img_attn.norm.query_norm.scale", "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
             "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
             "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale"}
    out = {}
    for i in range(double_blocks):
        src, dst = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for end in ENDS:
            stacked(out, src + "attn.", QKV, f"{dst}img_attn.qkv", hidden, end)
            stacked(out, src + "attn.", ADDED_QKV, f"{dst}txt_attn.qkv", hidden, end)
            out.update({f"{src}{d}.{end}": (f"{dst}{o}.{end}", 0, None, False) for d, o in block_map.items()})
        out.update({f"{src}{d}": (f"{dst}{o}", 0, None, False) for d, o in norms.items()})
    for i in range(single_blocks):
        src, dst = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for end in ENDS:
            stacked(out, src + "attn.", QKV, f"{dst}linear1", hidden, end)
            out[f"{src}proj_mlp.{end}"] = (f"{dst}linear1.{end}", 3 * hidden, 4 * hidden, False)
            out[f"{src}norm.linear.{end}"] = (f"{dst}modulation.lin.{end}", 0, None, False)
            out[f"{src}proj_out.{end}"] = (f"{dst}linear2.{end}", 0, None, False)
        out[f"{src}attn.norm_q.weight"] = (f"{dst}norm.query_norm.scale", 0, None, False)
        out[f"{src}attn.norm_k.weight"] = (f"{dst}norm.key_norm.scale", 0, None, False)
    basic = [("final_layer.linear", "proj_out"), ("img_in", "x_embedder"),
             ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
             ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"), ("txt_in", "context_embedder"),
             ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
             ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
             ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
             ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2")]
    for end in ENDS:
        out.update({f"{d}.{end}": (f"{o}.{end}", 0, None, False) for o, d in basic})
        out[f"norm_out.linear.{end}"] = (f"final_layer.adaLN_modulation.1.{end}", 0, None, True)
    return out


def comfy_map(kind, state_dict_or_shapes):
    """ComfyUI's map for a diffusers transformer, sized from its tensors (block counts, hidden size)."""
    keys = list(state_dict_or_shapes)
    count = lambda prefix: len({k.split(".")[1] for k in keys if k.startswith(prefix + ".")})
    hidden = _rows(state_dict_or_shapes["context_embedder.weight"])
    if kind == "sd3":
        return sd3_map(count("transformer_blocks"), hidden)
    return flux_map(count("transformer_blocks"), count("single_transformer_blocks"), hidden)


def _rows(value):
    return value.shape[0] if hasattr(value, "shape") else value[0]


def swap_halves(tensor):
    """swap_scale_shift: the two halves of the rows exchanged (its own inverse)."""
    first, second = tensor.chunk(2)
    return torch.cat([second, first])


def diffusers_tensor_of(original, entry):
    """The diffusers tensor an original tensor holds at `entry` = (original key, first row, rows, swapped)."""
    _, start, rows, swapped = entry
    value = swap_halves(original) if swapped else original
    return value if rows is None else value[start:start + rows]


def comfy_lora_update(lora, module_key):
    """The update ComfyUI's loader adds for LoRA module `module_key` of a LoRA state dict (strength 1):
    up @ down * (alpha / rank if "<module>.alpha" is present, else 1.0), in fp32."""
    if f"{module_key}.lora_up.weight" in lora:
        up, down = lora[f"{module_key}.lora_up.weight"], lora[f"{module_key}.lora_down.weight"]
    else:
        up, down = lora[f"{module_key}.lora_B.weight"], lora[f"{module_key}.lora_A.weight"]
    alpha = lora.get(f"{module_key}.alpha")
    scale = alpha.item() / down.shape[0] if alpha is not None else 1.0
    return scale * (up.float() @ down.float())


def lora_modules(lora):
    """The module keys of a LoRA state dict (each key without its .lora_*.weight / .alpha ending)."""
    return sorted({re.sub(r"\.(lora_up|lora_down|lora_A|lora_B)\.weight$|\.alpha$", "", k) for k in lora})


VAE_LDM = [  # diffusers_convert.py: the LDM names of AutoencoderKL's tensors
    r"(encoder|decoder)\.(conv_in|conv_out|norm_out)\.(weight|bias)",
    r"encoder\.down\.\d+\.block\.\d+\.(norm1|conv1|norm2|conv2|nin_shortcut)\.(weight|bias)",
    r"encoder\.down\.\d+\.downsample\.conv\.(weight|bias)",
    r"decoder\.up\.\d+\.block\.\d+\.(norm1|conv1|norm2|conv2|nin_shortcut)\.(weight|bias)",
    r"decoder\.up\.\d+\.upsample\.conv\.(weight|bias)",
    r"(encoder|decoder)\.mid\.block_[12]\.(norm1|conv1|norm2|conv2)\.(weight|bias)",
    r"(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)",
]
