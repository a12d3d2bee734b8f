"""One imagefolder reader: training skips and reports bad lines, the eval set refuses them."""
import json

import pytest
from PIL import Image

from errors import UsageError
from fid_metrics import read_eval_set
from imagefolder import load_image, read_metadata


@pytest.fixture
def folder(tmp_path):
    Image.new("RGB", (40, 30), "red").save(tmp_path / "ok.png")
    lines = [json.dumps({"file_name": "ok.png", "text": "a red square"}), "{not json", "",
             json.dumps({"file_name": "ok.png"}), json.dumps({"file_name": "gone.png", "text": "missing"})]
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_reader_keeps_good_lines_and_names_every_skipped_one(folder):
    for path in (folder, folder / "metadata.jsonl"):
        records, problems = read_metadata(path)
        assert [(r["file_name"], r["text"], r["image"]) for r in records] == [("ok.png", "a red square", folder / "ok.png")]
        assert problems["metadata_lines"] == ["line 2: invalid JSON (Expecting property name enclosed in double quotes)",
                                              "line 4: no 'text'"]
        assert problems["missing_images"] == ["line 5: gone.png does not exist"]
    assert load_image(folder / "ok.png").size == (40, 30)


def test_vae_data_may_have_empty_or_no_text(folder):
    records, problems = read_metadata(folder, require_text=False)
    assert [(r["file_name"], r["text"]) for r in records] == [("ok.png", "a red square"), ("ok.png", "")]
    assert len(problems["metadata_lines"]) == 1 and problems["missing_images"] == ["line 5: gone.png does not exist"]


def test_eval_set_refuses_what_training_would_skip(folder):
    with pytest.raises(ValueError, match="2 unusable line.*line 2"):
        read_eval_set(folder / "metadata.jsonl")
    with pytest.raises(UsageError, match="does not exist"):
        read_eval_set(folder / "nothing.jsonl")
    with pytest.raises(FileNotFoundError):
        read_metadata(folder / "sub")
