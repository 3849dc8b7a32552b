"""inputs/hfdata.py: Hugging Face datasets written here with datasets / pyarrow (save_to_disk
folders, parquet files split into row groups and splits) read back row for row."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from gradindex.errors import DataError
from gradindex.inputs.dataref import has_parquet, is_hf_folder
from gradindex.inputs.hfdata import HFSource, ParquetTable, _split_files

datasets = pytest.importorskip("datasets")


def _pixels(n=5, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 6, 4, 3), dtype=np.uint8)  # HWC


def _png(hwc: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(hwc).save(buf, format="PNG")
    return buf.getvalue()


def test_a_saved_dataset_gives_its_images_captions_and_ids(tmp_path):
    px = _pixels()
    ds = datasets.Dataset.from_dict(
        {
            "image": [{"bytes": _png(p), "path": None} for p in px],
            "text": [f"caption {i}" for i in range(5)],
            "key": [f"k{i}" for i in range(5)],
        },
        features=datasets.Features(
            {
                "image": datasets.Image(),
                "text": datasets.Value("string"),
                "key": datasets.Value("string"),
            }
        ),
    )
    ds.save_to_disk(str(tmp_path / "ds"))
    assert is_hf_folder(tmp_path / "ds")
    src = HFSource(tmp_path / "ds", 3, id_column="key")
    assert src.decodes and src.ids.tolist() == [f"k{i}" for i in range(5)]
    assert src.prompts == [f"caption {i}" for i in range(5)]
    np.testing.assert_array_equal(src.read(1, 4), px[1:4].transpose(0, 3, 1, 2))
    with pytest.raises(DataError, match="no column 'label' \\(has: image, text, key\\)"):
        HFSource(tmp_path / "ds", 3, label_column="label")


def _write_parquet(path, px, start, group):
    table = pa.table(
        {
            "pixels": [p.transpose(2, 0, 1).tolist() for p in px],  # [C, H, W] array cells
            "label": list(range(start, start + len(px))),
        }
    )
    pq.write_table(table, path, row_group_size=group)


def test_parquet_rows_across_row_groups_and_files_and_one_split_of_several(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    px = _pixels(7, seed=1)
    _write_parquet(data / "train-00000-of-00002.parquet", px[:4], 0, group=3)
    _write_parquet(data / "train-00001-of-00002.parquet", px[4:], 4, group=2)
    _write_parquet(data / "test-00000-of-00001.parquet", _pixels(2, seed=9), 100, group=1)
    assert has_parquet(tmp_path)
    src = HFSource(tmp_path, 3, image_column="pixels")  # the train split by default
    assert len(src) == 7 and not src.decodes
    assert src.labels.tolist() == list(range(7))
    np.testing.assert_array_equal(src.read(2, 6), px[2:6].transpose(0, 3, 1, 2))  # 3 groups
    table = ParquetTable(sorted(data.glob("train-*.parquet")))
    assert table.num_rows == 7 and table.column("label", 1, 7) == [1, 2, 3, 4, 5, 6]
    test = HFSource(tmp_path, 3, image_column="pixels", split="test")
    assert test.labels.tolist() == [100, 101]
    with pytest.raises(DataError, match="splits \\['test', 'train'\\]; name one"):
        HFSource(tmp_path, 3, image_column="pixels", split="validation")


def test_split_files_keeps_a_lone_file_and_picks_train(tmp_path):
    a, b = tmp_path / "x.parquet", tmp_path / "train/0000.parquet"
    assert _split_files(tmp_path, [a], None) == [a]
    files = [tmp_path / "test/0000.parquet", b]
    assert _split_files(tmp_path, files, None) == [b]


def test_bad_datasets_are_refused_in_one_line(tmp_path):
    px = _pixels(3)
    ds = datasets.Dataset.from_dict({"snapshot": [p.tolist() for p in px], "id": ["a", "a", "b"]})
    ds.save_to_disk(str(tmp_path / "rep"))
    with pytest.raises(DataError, match="no image column \\(looked for"):
        HFSource(tmp_path / "rep", 3)
    with pytest.raises(DataError, match="column 'id' holds repeated ids"):
        HFSource(tmp_path / "rep", 3, image_column="snapshot")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="neither a saved dataset .* nor parquet files"):
        HFSource(tmp_path / "plain", 3)


def test_an_empty_saved_dataset_is_a_one_line_error(tmp_path):
    """datasets saves a dataset of no rows as 0 shards and then fails to load it with an
    IndexError: that was a traceback; it is the same 'empty' error as an empty parquet file."""
    empty = datasets.Features({"image": datasets.Value("binary")})
    datasets.Dataset.from_dict({"image": []}, features=empty).save_to_disk(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="the dataset is empty"):
        HFSource(tmp_path / "empty", 3)
