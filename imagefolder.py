"""The Hugging Face imagefolder layout that training and evaluation read: metadata.jsonl records and RGB images."""
import json
from pathlib import Path

from PIL import Image, ImageOps


def read_metadata(path, require_text=True):
    """Usable {"file_name", "text", "image"} records of an imagefolder's metadata.jsonl (the file, or its folder),
    and the skipped lines: {"metadata_lines": [...], "missing_images": [...]}, each entry naming its line.

    A line is skipped when it is not JSON, lacks a non-empty `file_name` or `text`, or names an image that does not
    exist (`file_name` is relative to the jsonl's folder). require_text False: `text` may be empty or absent (VAE
    data such as SA-1B's). Images are not decoded here.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "metadata.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: an imagefolder needs a metadata.jsonl holding one JSON object a "
                                f"line with 'file_name' (relative to its folder) and 'text'")
    records, bad_lines, missing = [], [], []
    with open(path, encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as error:
                bad_lines.append(f"line {number}: invalid JSON ({error.msg})")
                continue
            for key in ("file_name", "text") if require_text else ("file_name",):
                if not isinstance(entry, dict) or not isinstance(entry.get(key), str) or not entry[key].strip():
                    bad_lines.append(f"line {number}: no '{key}'")
                    break
            else:
                image = path.parent / entry["file_name"]
                if not image.is_file():
                    missing.append(f"line {number}: {entry['file_name']} does not exist")
                else:
                    text = entry.get("text") if isinstance(entry.get("text"), str) else ""
                    records.append({"file_name": entry["file_name"], "text": text, "image": image})
    return records, {"metadata_lines": bad_lines, "missing_images": missing}


def load_image(path):
    """An RGB image, EXIF orientation applied, fully decoded (so a truncated file fails here, not later)."""
    with Image.open(path) as image:
        return ImageOps.exif_transpose(image).convert("RGB")
