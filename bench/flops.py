"""Analytic forward FLOPs of the SD3 and Flux transformers (matmuls + attention), for MFU.

One multiply-add counts 2 FLOPs. Counted: every Linear / patch conv and the two attention products
(Q·Kᵀ and P·V); not counted: norms, activations, softmax, RoPE, biases. The tests check these formulas
exactly against the shapes of the products a model runs, captured at the ATen dispatcher while it runs. Training costs about
3x the forward (4x with gradient checkpointing).
"""

# Dense bf16 tensor-core peaks (vendor data sheets; SXM unless named), first match wins, for MFU.
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H200": 989.0, "H100": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
                    "RTX 4090": 165.0}


def linear_flops(tokens, d_in, d_out):
    """A Linear layer d_in -> d_out applied to `tokens` vectors."""
    return 2 * tokens * d_in * d_out


def attention_flops(q_tokens, kv_tokens, dim):
    """Q·Kᵀ and softmax(Q·Kᵀ)·V summed over heads (dim = heads x head_dim)."""
    return 2 * linear_flops(q_tokens, dim, kv_tokens)


def mlp_flops(tokens, dim, hidden):
    """Two-layer MLP dim -> hidden -> dim."""
    return linear_flops(tokens, dim, hidden) + linear_flops(tokens, hidden, dim)


def image_tokens(height, width, vae_factor=16, patch=2):
    """Transformer image tokens of a height x width image (SD3 patch 2 / Flux 2x2 packing on F=16 latents)."""
    return (height // (vae_factor * patch)) * (width // (vae_factor * patch))


def sd3_transformer_flops(config, image_tokens, text_tokens, batch=1):
    """Forward FLOPs of `SD3Transformer2DModel(config)` on `batch` samples (CFG doubles the batch).

    text_tokens is the length of the joint text sequence (77 CLIP + T5 max_sequence_length).
    Handles SD3.5's `dual_attention_layers` (an extra image-only self-attention in those blocks).
    """
    c = dict(config)
    d, n, t, p = c["num_attention_heads"] * c["attention_head_dim"], image_tokens, text_tokens, c["patch_size"]
    dual = set(c.get("dual_attention_layers") or ())
    flops = linear_flops(n, c["in_channels"] * p * p, d)  # patch embedding (a stride-p conv)
    flops += linear_flops(1, 256, d) + linear_flops(1, d, d)  # timestep MLP
    flops += linear_flops(1, c["pooled_projection_dim"], d) + linear_flops(1, d, d)  # pooled-text MLP
    flops += linear_flops(t, c["joint_attention_dim"], c["caption_projection_dim"])
    for i in range(c["num_layers"]):
        last = i == c["num_layers"] - 1  # the last block updates only the image stream
        flops += linear_flops(1, d, (9 if i in dual else 6) * d) + linear_flops(1, d, (2 if last else 6) * d)
        flops += linear_flops(n + t, d, 3 * d) + attention_flops(n + t, n + t, d)  # joint attention
        flops += linear_flops(n if last else n + t, d, d)  # output projections
        flops += mlp_flops(n if last else n + t, d, 4 * d)
        if i in dual:
            flops += linear_flops(n, d, 3 * d) + attention_flops(n, n, d) + linear_flops(n, d, d)
    flops += linear_flops(1, d, 2 * d) + linear_flops(n, d, p * p * (c.get("out_channels") or c["in_channels"]))
    return batch * flops


def flux_transformer_flops(config, image_tokens, text_tokens, batch=1):
    """Forward FLOPs of `FluxTransformer2DModel(config)` on `batch` samples.

    image_tokens counts packed 2x2 latent patches; text_tokens is the T5 max_sequence_length (512 for FLUX.1-dev).
    """
    c = dict(config)
    d, n, t = c["num_attention_heads"] * c["attention_head_dim"], image_tokens, text_tokens
    s, p = n + t, c["patch_size"]
    flops = linear_flops(n, c["in_channels"], d) + linear_flops(t, c["joint_attention_dim"], d)
    embedders = 2 if c.get("guidance_embeds") else 1  # timestep (and guidance) MLPs, 256 -> d -> d
    flops += embedders * (linear_flops(1, 256, d) + linear_flops(1, d, d))
    flops += linear_flops(1, c["pooled_projection_dim"], d) + linear_flops(1, d, d)
    double = 2 * linear_flops(1, d, 6 * d)  # adaLN modulation of both streams
    double += linear_flops(s, d, 3 * d) + attention_flops(s, s, d) + linear_flops(s, d, d) + mlp_flops(s, d, 4 * d)
    single = linear_flops(1, d, 3 * d)
    single += linear_flops(s, d, 3 * d) + attention_flops(s, s, d)  # attention, no output projection ...
    single += linear_flops(s, d, 4 * d) + linear_flops(s, 5 * d, d)  # ... parallel MLP, one fused output Linear
    flops += c["num_layers"] * double + c["num_single_layers"] * single
    flops += linear_flops(1, d, 2 * d) + linear_flops(n, d, p * p * (c.get("out_channels") or c["in_channels"]))
    return batch * flops


def peak_flops(device_name):
    """Dense bf16 peak FLOP/s of a GPU named like torch.cuda.get_device_name(), or None when unknown."""
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key.lower() in device_name.lower():
            return tflops * 1e12
    return None
