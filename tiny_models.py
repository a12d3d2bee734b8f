"""Tiny random-weight SD3 and Flux pipelines, built offline and deterministically, for tests and the demo."""
import argparse
import json
from pathlib import Path

import torch
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
                       SD3Transformer2DModel, StableDiffusion3Pipeline)
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5Config,
                          T5EncoderModel, T5TokenizerFast)

from errors import HelpFormatter, exit_on_usage_error

# Latent normalisation of the real checkpoints (PROTOCOL.md §2): kept so the tiny pipelines exercise the same code.
VAE_FACTORS = {"sd3": (1.5305, 0.0609), "flux": (0.3611, 0.1159)}
CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512
# Words that get whole-word tokens; anything else falls back to bytes (CLIP) or characters (T5).
WORDS = (
    "a an the of in on at with and by to from for is photo photograph picture painting portrait image "
    "cat dog bird horse tree trees flower flowers forest mountain mountains lake river sea ocean beach sky "
    "cloud clouds sun sunset sunrise night city street building house castle car boat man woman girl boy "
    "child face eyes hair red green blue yellow orange purple white black golden gray pink brown dark light "
    "bright small large big old young beautiful detailed high resolution quality 4k 8k ultra sharp realistic "
    "close up view landscape nature snow winter summer autumn spring rain water field grass rock stone astronaut "
    "space coffee cup rocket camera standing sitting under over highly intricate texture"
).split()


# ---------------------------------------------------------------------------------------------------------
# Tokenizers, made without any download
# ---------------------------------------------------------------------------------------------------------

def _bytes_to_unicode():
    """GPT-2/CLIP byte-to-printable-character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def build_clip_tokenizer():
    """A byte-level BPE CLIP tokenizer: every byte (and its `</w>` form) plus whole-word merges for WORDS."""
    chars = list(_bytes_to_unicode().values())
    vocab = {}
    for token in chars + [c + "</w>" for c in chars]:
        vocab[token] = len(vocab)
    merges = []
    for word in WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            merged = parts[0] + parts[1]
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(merged, len(vocab))
            parts = [merged] + parts[2:]
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH)


def build_t5_tokenizer():
    """A Unigram T5 tokenizer with whole-word pieces for WORDS and single-character fallbacks."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -5.0 - 0.01 * i) for i, w in enumerate(WORDS)]
    pieces += [(c, -10.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"-()/&+"]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=T5_MAX_LENGTH)


# ---------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------

def build_tiny_vae(kind="sd3", seed=0):
    """The SD3/Flux VAE topology in miniature: 4 down/up blocks, 16 latent channels, no quant convs."""
    scaling, shift = VAE_FACTORS[kind]
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 16, 16),
                         layers_per_block=2, latent_channels=16, norm_num_groups=4, sample_size=256,
                         scaling_factor=scaling, shift_factor=shift, use_quant_conv=False, use_post_quant_conv=False)


def _clip_text_encoder(tokenizer, with_projection, seed):
    """A 2-layer CLIP text encoder sized for the tiny tokenizer."""
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, projection_dim=32, max_position_embeddings=CLIP_MAX_LENGTH,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, hidden_act="gelu")
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def _t5_text_encoder(tokenizer, seed):
    """A 2-layer T5 encoder; d_model 64 so that SD3's padded CLIP features (2 x 32) fit."""
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tokenizer), d_model=64, d_kv=16, d_ff=64, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
    return T5EncoderModel(config)


def build_tiny_sd3_pipeline(seed=0):
    """A complete StableDiffusion3Pipeline with random weights (≈ 3 MB)."""
    clip_tok = build_clip_tokenizer()
    t5_tok = build_t5_tokenizer()
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=16, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64,
                                        caption_projection_dim=32, pooled_projection_dim=64, out_channels=16,
                                        pos_embed_max_size=96)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=build_tiny_vae("sd3", seed + 1), text_encoder=_clip_text_encoder(clip_tok, True, seed + 2),
        tokenizer=clip_tok, text_encoder_2=_clip_text_encoder(clip_tok, True, seed + 3),
        tokenizer_2=build_clip_tokenizer(), text_encoder_3=_t5_text_encoder(t5_tok, seed + 4), tokenizer_3=t5_tok)


def build_tiny_flux_pipeline(seed=0):
    """A complete FluxPipeline (guidance embedding on, FLUX.1-dev scheduler) with random weights."""
    clip_tok = build_clip_tokenizer()
    t5_tok = build_t5_tokenizer()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64,
                                         pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(transformer=transformer, scheduler=scheduler, vae=build_tiny_vae("flux", seed + 1),
                        text_encoder=_clip_text_encoder(clip_tok, False, seed + 2), tokenizer=clip_tok,
                        text_encoder_2=_t5_text_encoder(t5_tok, seed + 3), tokenizer_2=t5_tok)


def is_stand_in(path):
    """Whether a weight file or folder is one of this module's random stand-ins: the folder it sits in holds the
    TINY_RANDOM_WEIGHTS.json marker written beside them (None: no file given)."""
    return path is not None and (Path(path).resolve().parent / MARKER).is_file()


def save_tiny_pipelines(out_dir, seed=0):
    """Write OUT/tiny-sd3 and OUT/tiny-flux as diffusers directories; returns {"sd3": path, "flux": path}."""
    out_dir = Path(out_dir)
    paths = {}
    for kind, build in (("sd3", build_tiny_sd3_pipeline), ("flux", build_tiny_flux_pipeline)):
        path = out_dir / f"tiny-{kind}"
        build(seed).save_pretrained(path, safe_serialization=True)
        (path / MARKER).write_text(json.dumps({"kind": kind, "seed": seed}) + "\n")
        paths[kind] = path
    return paths


# ---------------------------------------------------------------------------------------------------------
# Real-width shallow transformers: the widths, head sizes and RoPE axes of SD3-medium and FLUX.1-dev with one block
# of each kind, for what tiny widths cannot reach (diffusers' Flux single-file converter hardcodes the 3072 width,
# ComfyUI's model detection Flux's head size and RoPE axes) and for measuring exports
# ---------------------------------------------------------------------------------------------------------

REAL_WIDTH_CONFIGS = {  # the released transformers' config.json, but the depth
    "sd3": dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=64,
                num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                pooled_projection_dim=2048, pos_embed_max_size=192),
    "flux": dict(patch_size=1, in_channels=64, attention_head_dim=128, num_attention_heads=24,
                 joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
}
REAL_WIDTH_DTYPES = {"sd3": torch.float16, "flux": torch.bfloat16}  # the released checkpoints' dtypes
REAL_WIDTH_SHARD = "200MB"  # several shards, as save_pretrained writes a 12 B model (at its 10 GB default)


def real_width_depth(kind, blocks):
    """SD3: `blocks` joint blocks plus its last, context-only one; Flux: `blocks` double- and single-stream blocks."""
    return {"num_layers": blocks + 1} if kind == "sd3" else {"num_layers": blocks, "num_single_layers": blocks}


def random_real_width_value(name, shape, generator):
    """A random value for a parameter: weights ~ N(0, 1/fan_in) (activations stay O(1)); norm scales 1 + N(0, 0.1^2),
    so that a q/k norm mix-up changes the output; biases N(0, 0.02^2)."""
    if len(shape) > 1:
        fan_in = 1
        for n in shape[1:]:
            fan_in *= n
        return torch.randn(shape, generator=generator) / fan_in ** 0.5
    if "norm" in name and name.endswith(".weight"):
        return 1 + 0.1 * torch.randn(shape, generator=generator)
    return 0.02 * torch.randn(shape, generator=generator)


def build_real_width_transformer(kind, blocks=1, seed=0):
    """The SD3-medium or FLUX.1-dev transformer at its real widths and `blocks` blocks of each kind, random weights
    (Flux: 0.55 B parameters at blocks=1), in the released checkpoint's dtype. Built parameter by parameter from
    the meta device, so that no second copy exists."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device

    cls = FluxTransformer2DModel if kind == "flux" else SD3Transformer2DModel
    with init_empty_weights():  # parameters on the meta device; buffers (SD3's positional table) built as usual
        model = cls(**REAL_WIDTH_CONFIGS[kind], **real_width_depth(kind, blocks))
    generator = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        value = random_real_width_value(name, tuple(param.shape), generator)
        set_module_tensor_to_device(model, name, "cpu", value=value.to(REAL_WIDTH_DTYPES[kind]))
    return model.to(REAL_WIDTH_DTYPES[kind]).eval()


def save_real_width_transformers(out_dir, seed=0, blocks=1, kinds=("sd3", "flux")):
    """Write OUT/real-width-<kind>/transformer/ (sharded, as the trainers' save_pretrained writes); returns
    {kind: the folder holding transformer/}."""
    paths = {}
    for kind in kinds:
        path = Path(out_dir) / f"real-width-{kind}"
        build_real_width_transformer(kind, blocks, seed).save_pretrained(path / "transformer", safe_serialization=True,
                                                                         max_shard_size=REAL_WIDTH_SHARD)
        (path / "TINY_RANDOM_WEIGHTS.json").write_text(json.dumps({"kind": kind, "seed": seed, "blocks": blocks,
                                                                   "real_width": True}) + "\n")
        paths[kind] = path
    return paths


# ---------------------------------------------------------------------------------------------------------
# Metric-model stand-ins (random weights, the file formats a user downloads) for generate_and_eval_fid.py
# ---------------------------------------------------------------------------------------------------------

MARKER = "TINY_RANDOM_WEIGHTS.json"  # beside every random-weight model this module writes
TINY_METRIC_FILES = {  # the generate_and_eval_fid.py flag each stand-in is passed to; "random-": never real weights
    "clip_score_model": "random-clip-vit-base-patch16",
    "aesthetic_clip": "random-open_clip-vit-l-14",
    "aesthetic_head": "random-aesthetic-head.pth",
    "inception_weights": "random-fid-inception.pth",
}
# open_clip ViT-L/14 in miniature: same QuickGELU ViT and 768-d embedding (the aesthetic head's input), small towers.
TINY_OPEN_CLIP_CONFIG = {
    "embed_dim": 768,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": CLIP_MAX_LENGTH, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1},
}


def build_tiny_clip_score_model(seed=0):
    """(CLIPModel, CLIPProcessor) shaped like openai/clip-vit-base-patch16 in miniature (32x32 input)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = build_clip_tokenizer()
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "max_position_embeddings": CLIP_MAX_LENGTH,
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": 32, "patch_size": 8},
        projection_dim=32,
    )
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return CLIPModel(config).eval(), CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build_tiny_inception_state_dict(seed=0):
    """A random state dict for torch-fidelity's FID Inception (full size: the key layout is fixed), He-initialised
    so that features stay O(1); built with torchvision's InceptionV3, the same layout torch-fidelity loads."""
    from torchvision.models import inception_v3

    torch.manual_seed(seed)
    net = inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    for module in net.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
    return net.state_dict()


def save_tiny_metric_models(out_dir, seed=0):
    """Write random stand-ins of the four metric models to out_dir; returns {flag: path} (see TINY_METRIC_FILES).

    CLIP for CLIPScore: CLIPModel + CLIPProcessor folder (save_pretrained). Aesthetics CLIP: open_clip_config.json +
    open_clip_model.safetensors (the Hugging Face open_clip layout). The aesthetic MLP and the FID Inception:
    torch.save'd state dicts, like sac+logos+ava1-l14-linearMSE.pth and weights-inception-2015-12-05-6726825d.pth.
    """
    import open_clip
    from safetensors.torch import save_file

    from fid_metrics import AestheticHead

    out_dir = Path(out_dir)
    paths = {flag: out_dir / name for flag, name in TINY_METRIC_FILES.items()}
    model, processor = build_tiny_clip_score_model(seed + 1)
    model.save_pretrained(paths["clip_score_model"])
    processor.save_pretrained(paths["clip_score_model"])

    torch.manual_seed(seed + 2)
    clip = open_clip.CLIP(**TINY_OPEN_CLIP_CONFIG)
    paths["aesthetic_clip"].mkdir(parents=True, exist_ok=True)
    preprocess = {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD),
                  "interpolation": "bicubic", "resize_mode": "shortest"}
    (paths["aesthetic_clip"] / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": TINY_OPEN_CLIP_CONFIG, "preprocess_cfg": preprocess}, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()},
              paths["aesthetic_clip"] / "open_clip_model.safetensors")

    torch.manual_seed(seed + 3)
    torch.save(AestheticHead(TINY_OPEN_CLIP_CONFIG["embed_dim"]).state_dict(), paths["aesthetic_head"])
    torch.save(build_tiny_inception_state_dict(seed + 4), paths["inception_weights"])
    (out_dir / MARKER).write_text(json.dumps({"kind": "metrics", "seed": seed}) + "\n")
    return paths


def save_tiny_lpips_weights(out_dir, net="alex", seed=0):
    """Random LPIPS weights in the formats of the real files: (backbone, heads) paths.

    Backbone: torchvision's `features.*` state dict of AlexNet / VGG16 (as alexnet-owt-7be5be79.pth, without the
    classifier nobody reads). Heads: `lin{k}.model.1.weight` 1x1 convs with non-negative weights, as the lpips
    package's v0.1 files.
    """
    from torchvision.models import alexnet, vgg16

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    features = (alexnet if net == "alex" else vgg16)(weights=None).features
    backbone = {f"features.{k}": v for k, v in features.state_dict().items()}
    channels = [m.out_channels for m in features if isinstance(m, torch.nn.Conv2d)]
    channels = [channels[i] for i in ((0, 1, 2, 3, 4) if net == "alex" else (1, 3, 6, 9, 12))]
    heads = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) / c for k, c in enumerate(channels)}
    paths = out_dir / f"random-lpips-{net}-backbone.pth", out_dir / f"random-lpips-{net}-heads.pth"
    torch.save(backbone, paths[0])
    torch.save(heads, paths[1])
    (out_dir / MARKER).write_text(json.dumps({"kind": f"lpips-{net}", "seed": seed}) + "\n")
    return paths


def main(args):
    paths = save_tiny_pipelines(args.out, args.seed)
    for kind, path in paths.items():
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        print(f"{kind}: {path} ({size / 2**20:.1f} MB)")
    if args.real_width:
        for kind, path in save_real_width_transformers(args.out, args.seed).items():
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            print(f"{kind} at real width: {path} ({size / 2**20:.0f} MB)")
    if args.metrics:
        for flag, path in save_tiny_metric_models(Path(args.out) / "tiny-metrics", args.seed).items():
            print(f"--{flag} {path}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--out", required=True, help="folder that receives tiny-sd3/ and tiny-flux/")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random weight")
    parser.add_argument("--real_width", action="store_true",
                        help="also write OUT/real-width-sd3/ and OUT/real-width-flux/: SD3-medium's and FLUX.1-dev's "
                             "transformers at their real widths with one block of each kind (0.22 B and 0.55 B "
                             "parameters, sharded)")
    parser.add_argument("--metrics", action="store_true",
                        help="also write OUT/tiny-metrics/: random stand-ins of the FID, CLIPScore, Aesthetics models")
    return parser.parse_args(argv)


if __name__ == "__main__":
    exit_on_usage_error("tiny_models.py", main, parse_args())
