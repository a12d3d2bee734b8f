"""Eval-set metrics from local weight files (PROTOCOL.md §6): FID, CLIPScore and the LAION Aesthetics predictor.

FID: torchmetrics' FrechetInceptionDistance (2048-d pool features of torch-fidelity's Inception) on uint8
images; each real image has its shorter side resized to `size` (bilinear, antialiased) and is center-cropped
to size x size, as in the authors' `fid_preprocess`. CLIPScore: torchmetrics' `clip_score` with a local
openai/clip-vit-base-patch16, per image, max(100 cos(E_image, E_text), 0). Aesthetics: the normalised
OpenAI CLIP ViT-L/14 image embedding through the linear MLP of `sac+logos+ava1-l14-linearMSE.pth`.
"""
import pickle
import zipfile
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn as nn
import torchvision.transforms.functional as TF
from torchmetrics.functional.multimodal import clip_score
from torchmetrics.image.fid import FrechetInceptionDistance
from tqdm import tqdm
from transformers import CLIPModel, CLIPProcessor

from detail_metrics import compression_ratio, glcm_score
from errors import UsageError
from imagefolder import load_image, read_metadata

# Where a user gets each metric model (nothing is downloaded at run time).
WEIGHT_SOURCES = {
    "inception_weights": (
        "torch-fidelity's FID Inception weights, weights-inception-2015-12-05-6726825d.pth, from "
        "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth "
        "(the file torchmetrics' FrechetInceptionDistance downloads)"),
    "clip_score_model": (
        "a local copy of openai/clip-vit-base-patch16, e.g. "
        "`hf download openai/clip-vit-base-patch16 --local-dir pretrain/clip-vit-base-patch16`"),
    "aesthetic_clip": (
        "OpenAI CLIP ViT-L/14: the file ViT-L-14.pt from https://openaipublic.azureedge.net/clip/models/"
        "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt (what `clip.load('ViT-L/14')` "
        "caches in ~/.cache/clip), or open_clip's copy: the folder of the Hugging Face repo "
        "timm/vit_large_patch14_clip_224.openai (open_clip_config.json + open_clip weights, "
        "not timm's pytorch_model.bin)"),
    "aesthetic_head": (
        "the LAION improved-aesthetic-predictor head sac+logos+ava1-l14-linearMSE.pth from "
        "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac+logos+ava1-l14-linearMSE.pth"),
}
AESTHETIC_CLIP_ARCH = "ViT-L-14-quickgelu"  # OpenAI's CLIP uses QuickGELU; plain "ViT-L-14" would change its embeddings
CLIP_SCORE_TOKENS = 77


#################################################################################
#                              Checking weight files                            #
#################################################################################

def missing_metric_file(flag, path):
    """Why `path` given to --`flag` is not usable (a sentence), or None when it is."""
    if path is None:
        return f"--{flag} is required"
    path = Path(path)
    if not path.exists():
        return f"--{flag} {path} does not exist"
    if flag == "clip_score_model" and not (path / "config.json").is_file():
        return f"--{flag} {path} must be a transformers CLIP folder with config.json and the processor files"
    if flag == "aesthetic_clip" and path.is_dir() and not (path / "open_clip_config.json").is_file():
        return f"--{flag} {path} is a folder without open_clip_config.json; pass the weights file itself"
    if flag in ("inception_weights", "aesthetic_head") and not path.is_file():
        return f"--{flag} {path} must be a file"
    return None


def check_metric_files(paths):
    """Raise UsageError naming every unusable metric weight path of {flag: path} and where to get it."""
    problems = [(flag, missing_metric_file(flag, path)) for flag, path in paths.items()]
    problems = [f"{why}: get {WEIGHT_SOURCES[flag]}." for flag, why in problems if why]
    if problems:
        raise UsageError("Metric model weights are missing (nothing is downloaded at run time):\n  "
                         + "\n  ".join(problems))


def short(error):
    """An exception's message on one line, cut to 300 characters (state-dict errors list every key)."""
    text = " ".join(str(error).split())
    return text if len(text) <= 300 else text[:297] + "..."


#################################################################################
#                                     Images                                    #
#################################################################################

def to_uint8_tensor(image):
    """RGB PIL image -> uint8 tensor (3, H, W)."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def fid_tensor(image, size):
    """FID input (PROTOCOL.md §6): shorter side to `size` (antialiased bilinear), centre crop; (3, size, size) uint8."""
    tensor = to_uint8_tensor(image)
    if tensor.shape[1:] != (size, size):
        tensor = TF.resize(tensor, [size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        tensor = TF.center_crop(tensor, [size, size])
    return tensor


#################################################################################
#                                       FID                                     #
#################################################################################

def load_fid(inception_weights, device="cpu", feature=2048):
    """torchmetrics FID on Inception features (2048-d pool: the standard FID), with the weights file given.

    `antialias=False` keeps torch-fidelity's TF1-compatible resize to 299, the FID of the original
    implementation and of torchmetrics before 1.8 (the authors' numbers); 1.8+ defaults to antialiasing.
    """
    try:
        metric = FrechetInceptionDistance(feature=feature, normalize=False, antialias=False,
                                          feature_extractor_weights_path=str(inception_weights),
                                          sync_on_compute=False)  # one process sees every image
    except (RuntimeError, KeyError, zipfile.BadZipFile, EOFError) as error:
        raise UsageError(f"--inception_weights {inception_weights} is not torch-fidelity's Inception state dict "
                         f"({short(error)}); get {WEIGHT_SOURCES['inception_weights']}.") from error
    return metric.to(device)


@torch.no_grad()
def add_fid_images(metric, images, size, real):
    """Add a batch of PIL images to the real or generated side of the FID metric."""
    batch = torch.stack([fid_tensor(image, size) for image in images]).to(metric.device)
    metric.update(batch, real=real)


#################################################################################
#                                    CLIPScore                                  #
#################################################################################

class TruncatingProcessor:
    """A CLIPProcessor whose text is cut to CLIP's 77 tokens by the tokenizer, keeping the end-of-text token.

    (torchmetrics itself slices over-long token ids after tokenizing, which drops the token CLIP pools at.)
    """

    def __init__(self, processor, max_length=CLIP_SCORE_TOKENS):
        self.processor, self.max_length = processor, max_length

    def __call__(self, *args, **kwargs):
        if kwargs.get("text") is not None:
            kwargs.update(truncation=True, max_length=self.max_length)
        return self.processor(*args, **kwargs)


class ClipEmbeddings(nn.Module):
    """A CLIPModel whose get_image_features / get_text_features return the projected embedding tensor.

    transformers 5 returns an output object there, which torchmetrics 1.9's `clip_score` cannot use
    (Lightning-AI/torchmetrics#3407); with older transformers the tensor passes through unchanged.
    """

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    @staticmethod
    def _embedding(output):
        """The tensor itself, or the projected `pooler_output` of a transformers 5 output."""
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    def get_image_features(self, *args, **kwargs):
        return self._embedding(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs):
        return self._embedding(self.model.get_text_features(*args, **kwargs))


def load_clip_score_model(model_dir, device="cpu"):
    """(ClipEmbeddings, TruncatingProcessor) from a local transformers folder (e.g. openai/clip-vit-base-patch16)."""
    model = CLIPModel.from_pretrained(model_dir).eval().to(device)
    max_length = min(CLIP_SCORE_TOKENS, model.config.text_config.max_position_embeddings)
    return ClipEmbeddings(model), TruncatingProcessor(CLIPProcessor.from_pretrained(model_dir), max_length)


def count_truncated(prompts, processor):
    """How many prompts are longer than CLIP's context (start and end tokens included)."""
    tokenizer = processor.processor.tokenizer
    return sum(len(tokenizer(prompt)["input_ids"]) > processor.max_length for prompt in prompts)


@torch.no_grad()
def clip_scores(images, prompts, clip_model, processor):
    """Per-image CLIPScore, max(100 cos, 0), with torchmetrics' `clip_score` on the full uint8 image."""
    device = next(clip_model.parameters()).device
    return [float(clip_score(to_uint8_tensor(image).to(device), prompt,
                             model_name_or_path=lambda: (clip_model, processor)))
            for image, prompt in zip(images, prompts)]


#################################################################################
#                                   Aesthetics                                  #
#################################################################################

class AestheticHead(nn.Module):
    """The LAION improved-aesthetic-predictor MLP: linear layers 768-1024-128-64-16-1, dropout, no activation."""

    def __init__(self, input_size=768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embedding):
        return self.layers(embedding)


def is_torchscript(path):
    """Whether `path` is a TorchScript archive (OpenAI's own ViT-L-14.pt is one)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") for name in archive.namelist())


def load_aesthetic_clip(path, device="cpu", arch=AESTHETIC_CLIP_ARCH):
    """(open_clip model, eval preprocess) from a weights file (built as `arch`) or an open_clip folder."""
    path = Path(path)
    try:
        if path.is_dir():  # open_clip_config.json + weights, as on the Hugging Face hub
            model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{path}", device=device)
        else:  # OpenAI's TorchScript file needs torch.load(weights_only=False), which then runs torch.jit.load
            model, _, preprocess = open_clip.create_model_and_transforms(
                arch, pretrained=str(path), device=device, weights_only=not is_torchscript(path))
    except (RuntimeError, ValueError, KeyError) as error:
        raise UsageError(f"--aesthetic_clip {path} could not be loaded as OpenAI CLIP ViT-L/14 "
                         f"({short(error)}); get {WEIGHT_SOURCES['aesthetic_clip']}.") from error
    return model.eval(), preprocess


def load_aesthetic_head(path, device="cpu", input_size=768):
    """The aesthetic MLP with the state dict of `sac+logos+ava1-l14-linearMSE.pth` (keys layers.0/2/4/6/7)."""
    head = AestheticHead(input_size)
    try:
        head.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except (RuntimeError, TypeError, EOFError, pickle.UnpicklingError) as error:
        raise UsageError(f"--aesthetic_head {path} is not the {input_size}-input aesthetic MLP "
                         f"({short(error)}); get {WEIGHT_SOURCES['aesthetic_head']}.") from error
    return head.eval().to(device)


@torch.no_grad()
def aesthetic_scores(images, clip_model, preprocess, head):
    """Aesthetic score of each PIL image: head(E / |E|), E the CLIP image embedding."""
    device = next(head.parameters()).device
    embedding = clip_model.encode_image(torch.stack([preprocess(image) for image in images]).to(device)).float()
    return head(embedding / embedding.norm(dim=-1, keepdim=True)).squeeze(-1).tolist()


#################################################################################
#                                 Eval-set files                                #
#################################################################################

def read_eval_set(json_file, max_samples=None):
    """[{"index", "prompt", "real_image"}] from an imagefolder metadata.jsonl (`file_name` relative to its folder)."""
    try:
        records, problems = read_metadata(json_file)
    except FileNotFoundError:
        raise UsageError(f"--json_file {json_file} does not exist: pass e.g. ./data/Aesthetic-4K/eval/size_2048/"
                         f"metadata.jsonl (one JSON object a line with 'file_name' and 'text').") from None
    if problems["metadata_lines"]:  # every prompt counts in the eval protocol: nothing is skipped silently
        raise UsageError(f"{json_file}: {len(problems['metadata_lines'])} unusable line(s), e.g. "
                         f"{problems['metadata_lines'][0]}; each needs 'file_name' and 'text'.")
    if problems["missing_images"]:
        raise UsageError(f"{len(problems['missing_images'])} real image(s) listed in {json_file} are missing "
                         f"(FID needs them), e.g. {problems['missing_images'][0]}. Download the whole eval "
                         f"folder, not only metadata.jsonl.")
    if not records:
        raise UsageError(f"--json_file {json_file} holds no samples.")
    return [{"index": i, "prompt": r["text"], "real_image": r["image"]} for i, r in enumerate(records[:max_samples])]


#################################################################################
#                               The whole eval set                              #
#################################################################################

class MetricModels:
    """FID, CLIPScore and Aesthetics models, each loaded once from the local files given."""

    def __init__(self, inception_weights, clip_score_model, aesthetic_clip, aesthetic_head, device="cpu",
                 fid_feature=2048):
        check_metric_files({"inception_weights": inception_weights, "clip_score_model": clip_score_model,
                            "aesthetic_clip": aesthetic_clip, "aesthetic_head": aesthetic_head})
        self.fid = load_fid(inception_weights, device, fid_feature)
        self.clip_model, self.clip_processor = load_clip_score_model(clip_score_model, device)
        self.aesthetic_clip, self.aesthetic_preprocess = load_aesthetic_clip(aesthetic_clip, device)
        self.aesthetic_head = load_aesthetic_head(aesthetic_head, device)

    def to(self, device):
        """Move every model to `device`; returns self."""
        for name in ("fid", "clip_model", "aesthetic_clip", "aesthetic_head"):
            setattr(self, name, getattr(self, name).to(device))
        return self


class EvalImages(torch.utils.data.Dataset):
    """Per sample: the generated image, its GLCM Score and Compression Ratio, and the real image as FID input.

    GLCM and Compression Ratio are measured on `detail_paths` (default: the images themselves; the authors' protocol:
    their q95 JPEG files, with cr_mode "file"). Decoding 4K photos and the pixel metrics run in DataLoader workers,
    in parallel with the models.
    """

    def __init__(self, samples, image_paths, size, detail_paths=None, cr_mode="encode"):
        self.samples, self.image_paths, self.size = samples, image_paths, size
        self.detail_paths, self.cr_mode = detail_paths or image_paths, cr_mode

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        image = load_image(self.image_paths[i])
        detail = image if self.detail_paths[i] == self.image_paths[i] else load_image(self.detail_paths[i])
        ratio = compression_ratio([detail if self.cr_mode == "encode" else self.detail_paths[i]], self.cr_mode)
        real = fid_tensor(load_image(self.samples[i]["real_image"]), self.size)
        return image, glcm_score(detail), ratio, real


def as_columns(batch):
    """DataLoader collate: a list of per-sample tuples -> a list per field."""
    return [list(column) for column in zip(*batch)]


def evaluate_images(samples, image_paths, size, models, batch_size=8, num_workers=4, progress=True,
                    detail_paths=None, cr_mode="encode"):
    """Metrics of generated `image_paths` (one per sample) against the eval set; returns (metrics, per-image rows).

    Images are read `batch_size` at a time, so memory does not grow with the set. GLCM Score and
    Compression Ratio (Σ raw bytes / Σ JPEG q95 bytes) come from detail_metrics.py, measured on `detail_paths`
    (default: `image_paths`) with `cr_mode` ("encode": in memory; "file": the files' sizes on disk).
    """
    if len(samples) < 2:
        raise UsageError("FID needs at least 2 images on each side: use --max_samples 2 or more.")
    loader = torch.utils.data.DataLoader(EvalImages(samples, image_paths, size, detail_paths, cr_mode),
                                         batch_size=batch_size, num_workers=num_workers, collate_fn=as_columns)
    models.fid.reset()
    rows, start = [], 0
    for images, glcms, ratios, reals in tqdm(loader, desc="evaluating", unit="batch", disable=not progress):
        batch = samples[start:start + len(images)]
        prompts = [sample["prompt"] for sample in batch]
        add_fid_images(models.fid, images, size, real=False)
        models.fid.update(torch.stack(reals).to(models.fid.device), real=True)
        clips = clip_scores(images, prompts, models.clip_model, models.clip_processor)
        aesthetics = aesthetic_scores(images, models.aesthetic_clip, models.aesthetic_preprocess, models.aesthetic_head)
        for i, prompt, image, clip, aesthetic, glcm, ratio in zip(range(start, start + len(images)), prompts, images,
                                                                 clips, aesthetics, glcms, ratios):
            rows.append({"file": Path(image_paths[i]).name, "prompt": prompt, "clip_score": clip,
                         "aesthetics": aesthetic, "glcm_score": glcm, "compression_ratio": ratio,
                         "raw_bytes": image.width * image.height * 3})
        start += len(images)
    raw = sum(row["raw_bytes"] for row in rows)
    metrics = {
        "fid": float(models.fid.compute()),
        "clip_score": float(np.mean([row["clip_score"] for row in rows])),
        "aesthetics": float(np.mean([row["aesthetics"] for row in rows])),
        "glcm_score": float(np.mean([row["glcm_score"] for row in rows])),
        "compression_ratio": raw / sum(row["raw_bytes"] / row["compression_ratio"] for row in rows),
        "num_images": len(rows),
        "truncated_prompts": count_truncated([sample["prompt"] for sample in samples], models.clip_processor),
    }
    return metrics, rows
