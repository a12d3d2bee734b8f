"""4K generation with the stock SD3 / Flux pipelines and the F=16 VAE: the core of test_sd3.py and test_flux.py.

Public API (also used by generate_and_eval_fid.py; keep it stable):
    load_pipeline(model, checkpoint_path, vae_mode, grid, dtype, device, vae_path, lora_path, lora_scale, memory)
                                               -> pipeline (memory: a low_memory.LowMemory)
    generate(pipe, prompt, height, width, num_inference_steps, guidance_scale, seed, ...) -> (PIL image, timings)
    output_stem / output_path / prompt_slug   file names that say what made the image
    save_image(image, path, metadata, extra=None, overwrite=False); read_image_settings(path)
    add_generation_flags(parser, sampling)     the flags every generating script shares
    parse_args(model, argv) / main(args)       the command line shared by both scripts
The per-model settings (the paper's inference steps, guidance, T5 length) are models.MODELS[model].inference.
"""
import argparse
import dataclasses
import hashlib
import json
import re
import time
import unicodedata
import warnings
from pathlib import Path

import diffusers
import torch
from PIL import Image, PngImagePlugin

import lora
import low_memory
import outputs
from checkpoints import TRAINER_STATE
from errors import HelpFormatter, UsageError, check_at_least
from low_memory import LowMemory
from models import MODELS, Sampling, max_image_side, model_of
from partitioned_vae import GENERATION_MODES, VAE_MODES, check_size, load_vae, use_f16_vae

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
OFFLOADS = low_memory.OFFLOADS
JPEG_QUALITY = 95  # the authors save q95 JPEGs
# Used when no --prompt / --prompt_file is given: scenes in the spirit of the paper's 4K showcase.
SHOWCASE_PROMPTS = [
    "A snow leopard resting on a lichen-covered granite ledge at dawn, every whisker and snowflake in sharp focus, "
    "ultra-detailed 4K wildlife photograph",
    "Aerial view of terraced rice fields after rain, mist drifting between the ridges, small farmhouses with "
    "red roofs, golden morning light, highly detailed",
    "Close-up portrait of an elderly fisherman with weathered skin and a knitted wool cap, soft window light, "
    "intricate skin texture, 85mm photograph",
    "A glass greenhouse full of tropical orchids and hanging ferns, condensation on the panes, sunbeams through "
    "the haze, hyper-realistic, 4K",
    "A medieval harbour town at dusk, lanterns reflected in calm water, wooden sailing ships, cobblestone streets, "
    "rich oil painting with fine brushwork",
    "Macro photograph of a dragonfly wing covered in morning dew, iridescent veins, shallow depth of field, "
    "crisp detail",
]
COMPONENT_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin",
                "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "spiece.model", "tokenizer_config.json")


#################################################################################
#                        Checking the request before loading                    #
#################################################################################

def where_to_get(model):
    """How a user obtains the diffusers weights of `model` and where to put them."""
    spec = MODELS[model]
    return (f"Get the {spec.title} diffusers weights (accept the licence at https://huggingface.co/{spec.hub_repo}, "
            f"then `hf download {spec.hub_repo} --local-dir ./{spec.checkpoint_path}`) and pass "
            f"--checkpoint_path ./{spec.checkpoint_path}.")


def missing_component_file(folder):
    """The first file a diffusers component folder lacks (config, weights, shards, tokenizer), or None."""
    if not folder.is_dir():
        return f"folder {folder}"
    if folder.name.startswith("scheduler"):
        return None if (folder / "scheduler_config.json").is_file() else str(folder / "scheduler_config.json")
    if folder.name.startswith("tokenizer"):
        if any((folder / name).is_file() for name in TOKENIZER_FILES):
            return None
        return f"tokenizer files in {folder} (one of {', '.join(TOKENIZER_FILES)})"
    if not (folder / "config.json").is_file():
        return str(folder / "config.json")
    for index in sorted(folder.glob("*.index.json")):  # sharded weights: every shard must be there
        shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        missing = [shard for shard in shards if not (folder / shard).is_file()]
        return str(folder / missing[0]) + f" (listed in {index.name})" if missing else None
    if any((folder / name).is_file() for name in COMPONENT_WEIGHT_FILES) or any(folder.glob("*.safetensors")):
        return None
    return f"weights in {folder} ({' or '.join(COMPONENT_WEIGHT_FILES[:2])})"


def pipeline_folders(checkpoint_path):
    """(pipeline folder, transformer folder or None) that `checkpoint_path` stands for.

    A trainer's checkpoint-N holds the fine-tuned `transformer/` and names, in trainer_state.json, the base pipeline
    the run started from, which supplies every frozen component (PROTOCOL.md §4); any other folder is a pipeline.
    """
    root = Path(checkpoint_path)
    if (root / "model_index.json").is_file() or not (root / TRAINER_STATE).is_file():
        return root, None
    base = json.loads((root / TRAINER_STATE).read_text()).get("base_pipeline")
    if base is None:
        raise UsageError(f"{root} is a training checkpoint without a recorded base pipeline (written by an older "
                         f"trainer): generate from the run's output folder, or resume the run to write a new one.")
    if not (Path(base) / "model_index.json").is_file():
        raise UsageError(f"{root} takes its frozen components (VAE, text encoders) from the base pipeline its "
                         f"{TRAINER_STATE} names, {base}, which is not a pipeline folder any more: put the base "
                         f"pipeline back there.")
    return Path(base), root / "transformer"


def check_checkpoint(model, checkpoint_path):
    """Raise UsageError naming the first missing file unless checkpoint_path is a complete local `model` pipeline,
    or a trainer's checkpoint-N whose transformer and recorded base pipeline are complete."""
    root = Path(checkpoint_path)
    if not root.is_dir():
        raise UsageError(f"Checkpoint folder {root} does not exist. {where_to_get(model)}")
    root, transformer = pipeline_folders(root)
    if transformer is not None:
        missing = missing_component_file(transformer)
        if missing:
            raise UsageError(f"Training checkpoint {transformer.parent} is incomplete: missing {missing}.")
    index = root / "model_index.json"
    if not index.is_file():
        raise UsageError(f"{index} is missing: {root} is not a diffusers pipeline folder. {where_to_get(model)}")
    spec = json.loads(index.read_text())
    expected = MODELS[model].pipeline_class.__name__
    if spec.get("_class_name") != expected:
        other = next((m for m in MODELS.values() if m.pipeline_class.__name__ == spec.get("_class_name")), None)
        hint = f" Use {other.script} for it." if other else ""
        raise UsageError(f"{root} holds a {spec.get('_class_name')} checkpoint, not a {expected} one.{hint}")
    for name, entry in spec.items():
        if name.startswith("_") or not isinstance(entry, list) or None in entry:
            continue  # metadata, or an optional component the checkpoint leaves out
        if name == "transformer" and transformer is not None:
            continue  # the training checkpoint's own transformer replaces the base pipeline's
        missing = missing_component_file(root / name)
        if missing:
            raise UsageError(f"Checkpoint {root} is incomplete: missing {missing} (component '{name}'). "
                             f"{where_to_get(model)}")


def resolve_device(device):
    """torch.device for `device`, falling back to the CPU with a warning when CUDA is absent."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        warnings.warn("CUDA is not available: running on the CPU instead. That works but is very slow "
                      "(hours for a 4K image with the real models).", stacklevel=2)
        return torch.device("cpu")
    return device


def resolve_dtype(dtype, device):
    """torch dtype for "bf16" / "fp16" / "fp32" (or a torch.dtype), refusing what `device` cannot run well."""
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if device.type == "cpu" and torch_dtype == torch.float16:
        raise UsageError("--dtype fp16 is for GPUs: CPU half-precision kernels are slow or missing. "
                         "On the CPU use --dtype bf16 or --dtype fp32.")
    if device.type == "cuda" and torch_dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise UsageError(f"{torch.cuda.get_device_name(device)} has no bf16 support: use --dtype fp16 or fp32.")
    return torch_dtype


def check_resolution(pipe, height, width):
    """Raise UsageError when the transformer's positional embedding cannot address a height x width latent."""
    config, factor = pipe.transformer.config, pipe.vae_scale_factor
    max_pixels, patches = max_image_side(config, factor), config.get("pos_embed_max_size")
    if max_pixels and max(height, width) > max_pixels:  # Flux: rotary embeddings, no limit
        hint = " Use an F=16 --vae_mode (e.g. partitioned): it halves the latent size." if factor == 8 else ""
        raise UsageError(f"{height}x{width} is too large for this transformer: its positional embedding covers "
                         f"{patches}x{patches} patches, i.e. at most {max_pixels} pixels a side with an "
                         f"F={factor} VAE.{hint}")


def read_text_lines(path, label):
    """The lines of a UTF-8 text file; UsageError naming the first line that is not valid UTF-8."""
    lines = Path(path).read_bytes().splitlines()
    for number, line in enumerate(lines, 1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as error:
            raise UsageError(f"{label}: line {number} is not valid UTF-8 text ({error.reason} at byte {error.start}): "
                             f"save the file as UTF-8.") from None
    return [line.decode("utf-8") for line in lines]


def read_prompts(prompt=None, prompt_file=None):
    """The prompts to generate: --prompt, the non-blank lines of --prompt_file, or the built-in showcase list."""
    if prompt is not None:
        if not prompt.strip():
            raise UsageError("--prompt is empty: give a text prompt, or leave the flag out for the showcase prompts.")
        return [prompt.strip()]
    if prompt_file is not None:
        path = Path(prompt_file)
        if not path.is_file():
            raise UsageError(f"--prompt_file {path} does not exist.")
        prompts = [line.strip() for line in read_text_lines(path, f"--prompt_file {path}") if line.strip()]
        if not prompts:
            raise UsageError(f"--prompt_file {path} holds no prompt: write one prompt per line.")
        unique = list(dict.fromkeys(prompts))
        if len(unique) < len(prompts):
            warnings.warn(f"{path} repeats {len(prompts) - len(unique)} prompt(s): each is generated once.",
                          stacklevel=2)
        return unique
    return list(SHOWCASE_PROMPTS)


#################################################################################
#                              Loading and generating                           #
#################################################################################

def load_pipeline(model, checkpoint_path, vae_mode="partitioned", grid=2, dtype="bf16", device="cuda", vae_path=None,
                  lora_path=None, lora_scale=1.0, memory=LowMemory()):
    """The stock diffusers pipeline of `model` ("sd3" | "flux") from a local folder, with the F=16 VAE.

    vae_mode (partitioned_vae.GENERATION_MODES): "f8" keeps the stock F=8 VAE (the paper's baseline); "full" /
    "partitioned" / "subpixel" decode exactly (same image), "authors" with the authors' one-pixel crop (their SC-VAE
    checkpoint flux_wavelet_v2_sc); grid: partitions per side. vae_path: a VAE folder (or pipeline folder with vae/)
    to use instead of the checkpoint's, e.g. an SC-VAE from train_sc_vae.py.
    dtype: "bf16" | "fp16" | "fp32" or a torch.dtype. device: falls back to the CPU with a warning without CUDA.
    lora_path / lora_scale: an adapter fused into the transformer (lora.load_lora). memory: low_memory.LowMemory
    (offload hooks, fp8 storage, torchao, VAE tiling, compile; a mode the device cannot run is refused before anything
    loads, --cpu_offload is ignored with a warning on the CPU). Raises UsageError on a missing file.
    """
    if model not in MODELS:
        raise UsageError(f"Unknown model {model!r}: choose one of {', '.join(MODELS)}.")
    if vae_mode not in GENERATION_MODES:
        raise UsageError(f"Unknown --vae_mode {vae_mode!r}: choose one of {', '.join(GENERATION_MODES)}.")
    if memory.cpu_offload not in OFFLOADS:
        raise UsageError(f"Unknown --cpu_offload {memory.cpu_offload!r}: choose one of {', '.join(OFFLOADS)}.")
    check_checkpoint(model, checkpoint_path)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    low_memory.check_low_memory(device, memory.cpu_offload, memory.layerwise_casting, memory.quantize, memory.compile)
    if lora_path is not None:
        lora.adapter_file(lora_path)
    base, transformer = pipeline_folders(checkpoint_path)
    quantization = low_memory.quantization_config(memory.quantize)
    with warnings.catch_warnings():  # recent diffusers renamed `torch_dtype` to `dtype`; older ones know only this
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        # F=8 as saved (an SC-VAE's folder too): converted below with the rest of the pipeline.
        components = {"vae": load_vae(vae_path, "f8", torch_dtype=torch_dtype,
                                      flag="--pretrained_vae_model_name_or_path")} if vae_path else {}
        if transformer is not None:  # a training checkpoint: its transformer, the rest from the base pipeline
            components["transformer"] = MODELS[model].transformer_class.from_pretrained(
                transformer, torch_dtype=torch_dtype,
                quantization_config=None if quantization is None else quantization.quant_mapping["transformer"])
            quantization = None
        pipe = MODELS[model].pipeline_class.from_pretrained(base, torch_dtype=torch_dtype,
                                                            quantization_config=quantization, **components)
    if VAE_MODES[vae_mode].f16:
        use_f16_vae(pipe, vae_mode, grid)
    if lora_path is not None:
        lora.load_lora(pipe, lora_path, lora_scale)
    if memory.cpu_offload != "none" and device.type == "cpu":
        warnings.warn(f"--cpu_offload {memory.cpu_offload} only saves GPU memory: ignored on the CPU.", stacklevel=2)
        memory = dataclasses.replace(memory, cpu_offload="none")
    return low_memory.apply_low_memory(pipe, device, memory.cpu_offload, memory.layerwise_casting, memory.vae_tiling,
                                       memory.compile)


def vae_settings(vae_mode, grid, vae_path=None):
    """What a saved image records about its VAE."""
    f16 = VAE_MODES[vae_mode].f16
    return {"vae": "F16" if f16 else "F8 (stock)", "vae_mode": vae_mode, "grid": grid if f16 else None,
            "vae_path": None if vae_path is None else str(vae_path)}


def generate(pipe, prompt, height, width, num_inference_steps, guidance_scale, seed=0, max_sequence_length=None,
             negative_prompt=""):
    """One image from a CPU generator seeded with `seed`; returns (PIL image, timings).

    timings: text_encode_s (until the first transformer call), step_s (one entry per denoising step),
    s_per_step, decode_s (VAE decode + post-processing), total_s, peak_gpu_gb / peak_gpu_reserved_gb
    (torch's allocated / reserved peaks; None on the CPU).
    negative_prompt is used by SD3 only (Flux-dev has no classifier-free guidance).
    """
    cuda = pipe._execution_device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    marks = []  # start of the first transformer call, then the end of every step

    def on_first_transformer_call(module, inputs):
        if not marks:
            sync()
            marks.append(time.perf_counter())

    def on_step_end(pipe, step, timestep, callback_kwargs):
        sync()
        marks.append(time.perf_counter())
        return {}

    kwargs = {"prompt": prompt, "height": height, "width": width, "num_inference_steps": num_inference_steps,
              "guidance_scale": guidance_scale, "generator": torch.Generator("cpu").manual_seed(seed),
              "callback_on_step_end": on_step_end}
    if max_sequence_length:
        kwargs["max_sequence_length"] = max_sequence_length
    if model_of(pipe).negative_prompt:
        kwargs["negative_prompt"] = negative_prompt
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    hook = pipe.transformer.register_forward_pre_hook(on_first_transformer_call)
    start = time.perf_counter()
    try:
        image = pipe(**kwargs).images[0]
    finally:
        hook.remove()
    sync()
    end = time.perf_counter()
    steps = [b - a for a, b in zip(marks, marks[1:])]
    return image, {
        "text_encode_s": marks[0] - start,
        "step_s": steps,
        "s_per_step": sum(steps) / len(steps),
        "decode_s": end - marks[-1],
        "total_s": end - start,
        "peak_gpu_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
        "peak_gpu_reserved_gb": torch.cuda.max_memory_reserved() / 1e9 if cuda else None,
    }


#################################################################################
#                           Naming and saving the output                        #
#################################################################################

def prompt_slug(prompt, max_chars=48):
    """A file-name-safe start of the prompt: lowercase words joined by hyphens."""
    ascii_text = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode().lower()  # "é" -> "e"
    slug = "-".join(re.findall(r"[a-z0-9]+", ascii_text))[:max_chars].rstrip("-")
    return slug or "prompt"


def output_stem(model, prompt, height, width, guidance_scale, seed, vae_mode="partitioned"):
    """File name without extension that says what made the image, e.g.
    `sd3_a-snow-leopard-resting-on-a-lichen-covered-gran-1a2b3c4d_h4096-w3072_g7_seed0`.

    The 8 hex digits hash the whole prompt, so prompts that share their first words get different names. The VAE
    modes that change the image are named by their tag (partitioned_vae.VAE_MODES: -f8, -authors); the exact F=16
    modes give the same image and name.
    """
    digest = hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:8]
    vae = VAE_MODES[vae_mode].tag
    return f"{model}{vae}_{prompt_slug(prompt)}-{digest}_h{height}-w{width}_g{guidance_scale:g}_seed{seed}"


def output_path(save_path, model, prompt, height, width, guidance_scale, seed, save_format="png",
                vae_mode="partitioned"):
    """SAVE_PATH/<output_stem>.<png|jpg>."""
    stem = output_stem(model, prompt, height, width, guidance_scale, seed, vae_mode)
    return Path(save_path) / f"{stem}.{save_format}"


def sidecar_path(path):
    """The JSON file written next to an image: same name, .json extension."""
    return Path(path).with_suffix(".json")


def save_image(image, path, metadata, extra=None, overwrite=False):
    """Write a PIL image to `path` (.png or .jpg) with `metadata` embedded, plus the JSON sidecar.

    PNG: tEXt chunks "prompt" and "settings" (JSON). JPEG (quality 95): the JSON in the COM segment and the
    prompt as EXIF ImageDescription. The sidecar holds `metadata` and `extra` (e.g. timings, which would
    make the image bytes change from run to run). Both are written atomically, the sidecar first: an image under
    its final name is complete and has its sidecar (a sidecar alone, of a killed run, is replaced). Raises
    FileExistsError when the image exists, unless `overwrite`.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists: pass --overwrite to replace it, or choose another --save_path.")
    settings = json.dumps(metadata, ensure_ascii=False)
    suffix = path.suffix.lower()
    if suffix not in (".png", ".jpg", ".jpeg"):
        raise UsageError(f"Cannot save {path}: use a .png or .jpg file name.")
    sidecar = {"image": path.name, **metadata, **(extra or {})}
    outputs.write_json(sidecar_path(path), sidecar, ensure_ascii=False)
    with outputs.atomic_path(path) as tmp:
        if suffix == ".png":
            info = PngImagePlugin.PngInfo()
            info.add_text("prompt", str(metadata.get("prompt", "")))
            info.add_text("settings", settings)
            image.save(tmp, pnginfo=info)
        else:
            exif = Image.Exif()
            exif[0x010E] = str(metadata.get("prompt", ""))  # ImageDescription
            exif[0x0131] = "Diffusion-4K generation.py"  # Software
            image.convert("RGB").save(tmp, quality=JPEG_QUALITY, exif=exif, comment=settings.encode("utf-8"))
    return path


def read_image_settings(path):
    """The settings dict embedded in an image written by `save_image` (PNG tEXt or JPEG COM)."""
    with Image.open(path) as image:
        text = image.info.get("settings") or image.info.get("comment")
    if text is None:
        raise UsageError(f"{path} carries no generation settings.")
    return json.loads(text.decode("utf-8") if isinstance(text, bytes) else text)


#################################################################################
#                                 Command line                                  #
#################################################################################

def check_generation_flags(args):
    """UsageError naming the first sampling flag out of range (shared by the generating scripts)."""
    check_at_least(1, num_inference_steps=args.num_inference_steps, max_sequence_length=args.max_sequence_length,
                   grid=args.grid)


def main(args):
    """Generate one image per prompt and seed (seed, seed+1, ...); returns the saved image paths."""
    # Check the request before loading anything:
    check_at_least(1, num_images=args.num_images)
    check_generation_flags(args)
    check_size(args.height, args.width)
    prompts = read_prompts(args.prompt, args.prompt_file)
    check_checkpoint(args.model, args.checkpoint_path)
    seeds = [args.seed + i for i in range(args.num_images)]
    jobs = [(prompt, seed, output_path(args.save_path, args.model, prompt, args.height, args.width,
                                       args.guidance_scale, seed, args.save_format, args.vae_mode))
            for prompt in prompts for seed in seeds]
    with outputs.FolderLock(args.save_path, "--save_path"):  # one run at a time writes into a folder
        existing = [path for _, _, path in jobs if path.exists()]  # an image without its sidecar is never left
        if existing and not args.overwrite:
            more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
            raise UsageError(f"{existing[0]}{more} already exist(s): pass --overwrite to replace, "
                             f"or choose another --save_path.")
        return generate_jobs(args, jobs)


def generate_jobs(args, jobs):
    """Load the pipeline, generate and save each (prompt, seed, path) of `jobs`; returns the saved paths."""
    memory = LowMemory.from_args(args)
    pipe = load_pipeline(args.model, args.checkpoint_path, args.vae_mode, args.grid, args.dtype, args.device,
                         args.pretrained_vae_model_name_or_path, args.lora_path, args.lora_scale, memory)
    check_resolution(pipe, args.height, args.width)
    settings = {
        "model": args.model, "checkpoint_path": str(args.checkpoint_path),
        "height": args.height, "width": args.width, "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale, "max_sequence_length": args.max_sequence_length,
        **vae_settings(args.vae_mode, args.grid, args.pretrained_vae_model_name_or_path),
        "scheduler": type(pipe.scheduler).__name__,
        "dtype": args.dtype, "device": str(pipe._execution_device), **memory.settings(),
        **lora.generation_settings(args.lora_path, args.lora_scale),
        "generator": "torch.Generator('cpu').manual_seed(seed)",
        "diffusers": diffusers.__version__, "torch": torch.__version__,
    }
    saved, step_times = [], []
    for prompt, seed, path in jobs:
        negative = getattr(args, "negative_prompt", None)
        image, timings = generate(pipe, prompt, args.height, args.width, args.num_inference_steps,
                                  args.guidance_scale, seed, args.max_sequence_length, negative or "")
        metadata = {"prompt": prompt, **({"negative_prompt": negative} if negative is not None else {}),
                    "seed": seed, **settings}
        saved.append(save_image(image, path, metadata, extra={"timings": timings}, overwrite=args.overwrite))
        step_times += timings["step_s"]
        memory = f", peak GPU memory {timings['peak_gpu_gb']:.1f} GB" if timings["peak_gpu_gb"] is not None else ""
        print(f"saved {path} ({len(timings['step_s'])} steps, {timings['s_per_step']:.3f} s/step, "
              f"VAE decode {timings['decode_s']:.2f} s, total {timings['total_s']:.1f} s{memory})", flush=True)
    print(f"{len(saved)} image(s) in {args.save_path}: {sum(step_times) / len(step_times):.3f} s per denoising step "
          f"on average")
    return saved


def add_generation_flags(parser, sampling=None):
    """Flags of every generating script; sampling defaults: `sampling`'s, or None for the script to fill per model."""
    for field in dataclasses.fields(Sampling):  # num_inference_steps, guidance_scale, max_sequence_length (T5 tokens)
        parser.add_argument(f"--{field.name}", type=field.type, default=getattr(sampling, field.name, None),
                            help=None if sampling else "default: the chosen model's (models.py)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the CPU generator")
    parser.add_argument("--save_format", choices=("png", "jpg"), default="png", help="jpg: quality 95, as the authors")
    parser.add_argument("--vae_mode", choices=GENERATION_MODES, default="partitioned",
                        help="f8: the stock F=8 VAE (baseline); full / partitioned / subpixel: the F=16 VAE, exact "
                             "(same image); authors: F=16 with the authors' one-pixel crop (flux_wavelet_v2_sc)")
    parser.add_argument("--grid", type=int, default=2, help="partitions per side (partitioned, authors)")
    parser.add_argument("--pretrained_vae_model_name_or_path", default=None,
                        help="a VAE folder to use instead of the checkpoint's (e.g. an SC-VAE's OUTPUT_DIR/vae)")
    low_memory.add_generation_flags(parser)  # --cpu_offload, --layerwise_casting, --quantize, --vae_tiling, --compile
    lora.add_generation_flags(parser)  # --lora_path, --lora_scale
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")


def build_parser(model):
    """Argument parser of test_sd3.py / test_flux.py; the defaults are the paper's settings for `model`."""
    spec = MODELS[model]
    parser = argparse.ArgumentParser(prog=spec.script, description=f"Generate 4K images with {spec.title} and the "
                                                                    f"F=16 partitioned VAE (Diffusion-4K).",
                                     formatter_class=HelpFormatter)
    parser.set_defaults(model=model)
    parser.add_argument("--checkpoint_path", default=spec.checkpoint_path,
                        help=f"local diffusers folder of {spec.hub_repo} (or a fine-tuned copy)")
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default=None, help="text prompt (default: built-in showcase prompts)")
    prompt.add_argument("--prompt_file", default=None, help="text file, one prompt per line")
    if spec.negative_prompt:
        parser.add_argument("--negative_prompt", default="", help="the paper's: empty (default: '')")
    parser.add_argument("--height", type=int, default=4096)
    parser.add_argument("--width", type=int, default=3072)  # the authors recommend 4096x3072 / 3072x4096
    add_generation_flags(parser, spec.inference)
    parser.add_argument("--num_images", type=int, default=1, help="images per prompt, with seeds seed, seed+1, ...")
    parser.add_argument("--save_path", default="outputs")
    parser.add_argument("--overwrite", action="store_true", help="replace existing images (otherwise refuse)")
    parser.add_argument("--device", default="cuda")
    return parser


def parse_args(model, argv=None):
    """The flags of test_sd3.py / test_flux.py (`model`), parsed."""
    return build_parser(model).parse_args(argv)
