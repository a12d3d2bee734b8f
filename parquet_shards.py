"""Parquet shards in the Hub's `datasets` layout (an `image` struct of `bytes` and `path`, a `text` caption), read in
place with pyarrow: list the rows of a folder of shards, and read one row's image as Pillow reads a file."""
import io
from functools import lru_cache
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from errors import UsageError

IMAGE_COLUMN, CAPTION_COLUMN = "image", "text"  # the Hub's names for image datasets
SHARD_ERRORS = (OSError, pa.ArrowException)  # what a cut or corrupt shard raises


def find_shards(data_dir):
    """The sorted *.parquet files below `data_dir` (the Hub puts them in data/), hidden ones left out."""
    root = Path(data_dir)
    return sorted(p for p in root.rglob("*.parquet") if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(root).parts))


def is_parquet_folder(data_dir):
    """Whether `data_dir` is read as Parquet shards: no metadata.jsonl and at least one shard."""
    return Path(data_dir).is_dir() and not (Path(data_dir) / "metadata.jsonl").is_file() and bool(find_shards(data_dir))


def check_columns(schema, path, image_column, caption_column):
    """UsageError unless the shard has the image column (and the caption column when one is asked for)."""
    names = schema.names
    for flag, column in (("--image_column", image_column), ("--caption_column", caption_column)):
        if column is not None and column not in names:
            raise UsageError(f"{path} has no column {column!r} (it has {', '.join(names)}): pass {flag} NAME.")


def image_bytes(value):
    """The encoded image of one cell: the `bytes` of the Hub's image struct, or a binary cell itself."""
    if isinstance(value, dict):
        value = value.get("bytes")
    if isinstance(value, (bytes, bytearray)) and value:
        return bytes(value)
    raise ValueError("no image bytes in this row (the image struct's 'bytes' is empty)")


def caption_of(value):
    """(caption, problem): the caption when it is non-empty text, else None and why."""
    if isinstance(value, str) and value.strip():
        return value, None
    return None, "no caption" if value is None or value == "" else f"caption is not text ({type(value).__name__})"


def list_rows(data_dir, image_column=IMAGE_COLUMN, caption_column=CAPTION_COLUMN):
    """(records, problems): one record per row of every readable shard, {"parquet_file", "row", "file_name", "text"}
    (text None when missing or not text, with "caption_problem"), and a line for each shard that cannot be read.
    Only the caption column is read: the images stay in the shards."""
    records, problems = [], []
    for path in find_shards(data_dir):
        try:
            shard = pq.ParquetFile(path)
            check_columns(shard.schema_arrow, path, image_column, None)
            captions = (shard.read(columns=[caption_column]).column(0).to_pylist()
                        if caption_column in shard.schema_arrow.names else [None] * shard.metadata.num_rows)
        except SHARD_ERRORS as error:
            problems.append(f"{path}: not a readable Parquet shard, cut short? ({' '.join(str(error).split())[:160]})")
            continue
        for row, value in enumerate(captions):
            text, problem = caption_of(value)
            record = {"parquet_file": path, "row": row, "file_name": f"{path.relative_to(data_dir).as_posix()}#{row}",
                      "text": text, "image_column": image_column}
            if problem:
                record["caption_problem"] = problem
            records.append(record)
    return records, problems


@lru_cache(maxsize=None)
def row_groups(path):
    """[(row-group index, first row, rows)] of a shard."""
    meta, out, first = pq.ParquetFile(path).metadata, [], 0
    for g in range(meta.num_row_groups):
        out.append((g, first, meta.row_group(g).num_rows))
        first += meta.row_group(g).num_rows
    return out


@lru_cache(maxsize=1)  # rows read in order (prepare_data, the latent cache) read each row group once
def row_group_column(path, group, column):
    """One row group's column as a Python list (Parquet reads a column a row group at a time)."""
    return pq.ParquetFile(path).read_row_group(group, columns=[column]).column(0).to_pylist()


def read_row_image_bytes(path, row, column=IMAGE_COLUMN):
    """The encoded image bytes of row `row` of shard `path`."""
    for group, first, rows in row_groups(str(path)):
        if first <= row < first + rows:
            return image_bytes(row_group_column(str(path), group, column)[row - first])
    raise ValueError(f"{path} has no row {row}")


def open_row_image(path, row, column=IMAGE_COLUMN):
    """A file-like object of the row's image, for PIL.Image.open."""
    return io.BytesIO(read_row_image_bytes(path, row, column))
