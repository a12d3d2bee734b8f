"""One imagefolder reader: training skips and reports bad lines, the eval set refuses them."""
import json

import pytest
from PIL import Image

from errors import UsageError
from fid_metrics import read_eval_set
from imagefolder import IMAGE_SUFFIXES, list_images, load_image, read_metadata


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


def test_the_eval_set_refuses_a_row_outside_its_folder_naming_the_row(folder, tmp_path_factory):
    outside = tmp_path_factory.mktemp("elsewhere") / "real.png"
    Image.new("RGB", (40, 30), "blue").save(outside)
    eval_set = folder / "eval"
    eval_set.mkdir()
    Image.new("RGB", (40, 30), "red").save(eval_set / "ok.png")
    for name in (f"../{outside.parent.name}/real.png", str(outside), "../ok.png"):
        lines = [{"file_name": "ok.png", "text": "a red square"}, {"file_name": name, "text": "elsewhere"}]
        (eval_set / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
        with pytest.raises(UsageError, match=f"1 unusable line\\(s\\), e.g. line 2: '{name}' .*refused, not read"):
            read_eval_set(eval_set / "metadata.jsonl")
    records, _ = read_metadata(eval_set, require_text=False)  # the VAE's readers too (eval_vae, train_sc_vae)
    assert [r["file_name"] for r in records] == ["ok.png"]


def test_list_images_reads_the_metadata_or_every_file_and_names_the_folder_in_errors(folder, tmp_path_factory):
    # An imagefolder: its listed images (text optional), its skipped lines as problems.
    paths, problems = list_images(folder, "--data_dir X")
    assert paths == [folder / "ok.png", folder / "ok.png"]  # the line without text counts for VAE data
    assert problems == ["line 2: invalid JSON (Expecting property name enclosed in double quotes)",
                        "line 5: gone.png does not exist"]
    # A plain folder: every file below it but hidden ones, or those with an image suffix.
    plain = tmp_path_factory.mktemp("plain")
    (plain / "sub").mkdir()
    for name in ("b.PNG", "sub/a.jpg", "notes.txt", ".hidden.png"):
        (plain / name).write_bytes(b"")
    assert list_images(plain, "--data_dir X") == ([plain / "b.PNG", plain / "notes.txt", plain / "sub" / "a.jpg"], [])
    assert list_images(plain, "--data_dir X", IMAGE_SUFFIXES)[0] == [plain / "b.PNG", plain / "sub" / "a.jpg"]
    with pytest.raises(UsageError, match="--train_data_dir Y holds no images"):
        list_images(tmp_path_factory.mktemp("empty"), "--train_data_dir Y")
    with pytest.raises(UsageError, match="--data_dir Z is not a folder"):
        list_images(plain / "b.PNG", "--data_dir Z")
