"""Catalog mistakes (issue 13, point 11): every wrong key, type or value is one line on stderr naming
the catalog file, the dataset and the field, and `serve` exits 2 before serving anything; and an
unquoted glob the shell expanded into one PATH per slice is noticed (point 13)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import _free_port

from bil_transform.catalog import CatalogError, expanded_glob_warning, load_catalog

ONE = '[[datasets]]\nid = "brain"\npath = "brain.tif"\n'
SKELETONS = '\n[[datasets]]\nid = "cells"\nkind = "skeletons"\npath = "swc"\nspace = "brain"\n'

# (test id, catalog text, fragments the one line must hold besides the catalog's path)
MISTAKES = [
    ("misspelt-field", ONE + "voxel_sise = [2.0, 1.0, 1.0]\n",
     ["dataset 'brain' (datasets[0])", "'voxel_sise'", "did you mean 'voxel_size'?"]),
    ("misspelt-chunk", ONE + "chunks = [32, 32, 32]\n",
     ["dataset 'brain' (datasets[0])", "'chunks'", "did you mean 'chunk'?"]),
    ("other-case", ONE + "voxelSize = [2.0, 1.0, 1.0]\n", ["'voxelSize'", "did you mean 'voxel_size'?"]),
    ("singular-table", '[[dataset]]\nid = "brain"\npath = "brain.tif"\n',
     ["unknown table 'dataset'", "did you mean 'datasets'?"]),
    ("single-brackets", '[datasets]\nid = "brain"\npath = "brain.tif"\n',
     ["datasets must be an array of tables", "[[datasets]] (two brackets)"]),
    ("field-before-any-dataset", 'voxel_size = [1.0, 1.0, 1.0]\n' + ONE,
     ["unknown key 'voxel_size'", "below its [[datasets]] line"]),
    ("tokens-in-catalog", ONE + '[[tokens]]\ntoken = "secret"\ndatasets = ["*"]\n',
     ["tokens belong in their own file"]),
    ("empty", "", ["defines no datasets", "[[datasets]]"]),
    ("comments-only", "# nothing yet\n", ["defines no datasets"]),
    ("embargo-string", ONE + 'embargo = "no"\n',
     ["dataset 'brain' (datasets[0])", "embargo must be true or false", "got 'no'"]),
    ("chunk-int", ONE + "chunk = 64\n",
     ["dataset 'brain' (datasets[0])", "chunk must be three positive integers", "[64, 64, 64]", "got 64"]),
    ("chunk-float", ONE + "chunk = [64.0, 64, 64]\n", ["chunk must be three positive integers", "got [64.0, 64, 64]"]),
    ("voxel-size-float", ONE + "voxel_size = 2.0\n",
     ["dataset 'brain' (datasets[0])", "voxel_size must be three positive numbers", "got 2.0"]),
    ("voxel-size-two", ONE + "voxel_size = [2.0, 1.0]\n", ["voxel_size must be three", "got [2.0, 1.0]"]),
    ("voxel-size-bool", ONE + "voxel_size = [true, 1.0, 1.0]\n", ["voxel_size must be three", "got [true, 1.0, 1.0]"]),
    ("kind-int", ONE + "kind = 3\n",
     ["dataset 'brain' (datasets[0])", "kind must be one of 'image', 'labels'", "got 3"]),
    ("compression-unknown", ONE + 'compression = "lzma"\n', ["compression must be one of 'blosc'", "got 'lzma'"]),
    ("encoding-list", ONE + 'encoding = ["jpeg"]\n', ["encoding must be one of 'raw'", "got ['jpeg']"]),
    ("downsample-unknown", ONE + 'downsample = "max"\n', ["downsample must be one of 'mean'", "got 'max'"]),
    ("id-slash", '[[datasets]]\nid = "a/b"\npath = "brain.tif"\n',
     ["datasets[0]", "id 'a/b' may use only letters"]),
    ("id-int", '[[datasets]]\nid = 7\npath = "brain.tif"\n', ["datasets[0]", "id must be a non-empty string", "got 7"]),
    ("id-dots", '[[datasets]]\nid = ".."\npath = "brain.tif"\n', ["datasets[0]", "id '..' must hold a letter"]),
    ("duplicate-ids", ONE + "\n" + ONE,
     ["dataset 'brain' (datasets[1])", "id 'brain' is already the id of datasets[0]"]),
    ("path-missing", '[[datasets]]\nid = "brain"\nkind = "image"\n',
     ["dataset 'brain' (datasets[0])", "path must be a non-empty string", "got no path"]),
    ("path-int", '[[datasets]]\nid = "brain"\npath = 5\n', ["dataset 'brain' (datasets[0])", "path must be", "got 5"]),
    ("second-dataset-without-id", ONE + '\n[[datasets]]\npath = "other.tif"\nembargo = 1\n',
     ["datasets[1]", "embargo must be true or false", "got 1"]),
    ("metadata-nested-table", ONE + '[datasets.metadata]\nlab = "Smith"\n[datasets.metadata.grant]\nnumber = 5\n',
     ["dataset 'brain' (datasets[0])", "metadata.grant must be a string, number or boolean",
      "got a table {number = 5}"]),
    ("metadata-list", ONE + '[datasets.metadata]\ntags = ["a", "b"]\n', ["metadata.tags must be", "got ['a', 'b']"]),
    ("metadata-not-a-table", ONE + 'metadata = "lab Smith"\n', ["metadata must be a table", "got 'lab Smith'"]),
    ("metadata-catalog-field", ONE + '[datasets.metadata]\nkind = "labels"\n', ["metadata.kind is a catalog field"]),
    ("metadata-twice", ONE + 'title = "A"\n[datasets.metadata]\ntitle = "B"\n',
     ["metadata.title is also given at the top level"]),
    ("free-field-list", ONE + 'chunk_size = [32, 32, 32]\n',
     ["chunk_size is free metadata", "got [32, 32, 32]", "did you mean 'chunk'?"]),
    ("free-field-table", ONE + '[datasets.extra]\nlab = "Smith"\n',
     ["extra is free metadata", "must be a string, number or boolean", "got a table {lab = 'Smith'}"]),
    ("not-toml", ONE + "voxel_size = [2.0, 1.0\n", ["cannot read the catalog"]),
    # skeleton sources (issue 16): SWC tracings placed in an image's frame
    ("skeletons-no-space", ONE + SKELETONS.replace('space = "brain"\n', ""),
     ["dataset 'cells' (datasets[1])", "space must name the image dataset", "got no space"]),
    ("skeletons-space-unknown", ONE + SKELETONS.replace('space = "brain"', 'space = "brian"'),
     ["dataset 'cells' (datasets[1])", "space names 'brian', which is no dataset", "did you mean 'brain'?"]),
    ("skeletons-space-labels", ONE + 'kind = "labels"\n' + SKELETONS,
     ["space names 'brain', whose kind is 'labels'", "an image dataset"]),
    ("skeletons-units-unknown", ONE + SKELETONS + 'units = "nm"\n',
     ["dataset 'cells' (datasets[1])", "units must be one of 'micrometer', 'voxel'", "got 'nm'"]),
    ("skeletons-offset-two", ONE + SKELETONS + "offset = [1, 2]\n",
     ["offset must be three numbers [z, y, x] in the tracings' units (micrometers)", "got [1, 2]"]),
    ("skeletons-voxel-field", ONE + SKELETONS + "voxel_size = [1, 1, 1]\n",
     ["dataset 'cells' (datasets[1])", "voxel_size describes voxels, and a skeleton source", "its space image's"]),
    ("image-with-space", ONE + 'space = "other"\n',
     ["dataset 'brain' (datasets[0])", "space belongs to a skeleton source", "this dataset is image"]),
    # the part of a file holding several (issue 17): a BigDataViewer setup, a CZI scene
    ("setup-negative", ONE + "setup = -1\n",
     ["dataset 'brain' (datasets[0])", "setup must be a whole number from 0", "BigDataViewer", "got -1"]),
    ("scene-string", ONE + 'scene = "2"\n', ["scene must be a whole number from 0", "CZI", "got '2'"]),
    ("setup-on-skeletons", ONE + SKELETONS + "setup = 1\n",
     ["dataset 'cells' (datasets[1])", "setup describes voxels, and a skeleton source"]),
]


@pytest.mark.parametrize("text, fragments", [(t, f) for _, t, f in MISTAKES], ids=[i for i, _, _ in MISTAKES])
def test_a_catalog_mistake_is_one_line_and_exit_2(tmp_path, text, fragments):
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(text)
    run = subprocess.run([sys.executable, "-m", "bil_transform", "serve", "--config", str(catalog),
                          "--port", str(_free_port())], capture_output=True, text=True, timeout=60)
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    assert len(lines) == 1, run.stderr
    line = lines[0]
    assert line.startswith(f"bil-transform: {catalog}: "), line
    for fragment in fragments:
        assert fragment in line, (fragment, line)


def test_metadata_table_and_top_level_fields_are_searchable_metadata(tmp_path):
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(ONE + 'title = "Whole brain"\nuid = "u-17"\n'
                             '[datasets.metadata]\nspecies = "mouse"\nage_days = 56\npublic = true\n'
                             'acquired = 2023-01-05\n"chunks" = "fine to name this here"\n')
    [spec] = load_catalog(catalog)
    assert spec.metadata == {"title": "Whole brain", "uid": "u-17", "species": "mouse", "age_days": "56",
                             "public": "true", "acquired": "2023-01-05", "chunks": "fine to name this here"}
    assert spec.voxel_size is None and spec.chunk == (64, 64, 64) and spec.embargo is False


def test_catalog_fields_keep_their_values(tmp_path):
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(ONE + 'voxel_size = [2, 0.5, 0.5]\nkind = "labels"\nembargo = true\ndownsample = "stride"\n'
                             'compression = "zstd"\nencoding = "compressed_segmentation"\nchunk = [16, 32, 32]\n')
    [spec] = load_catalog(catalog)
    assert (spec.voxel_size, spec.kind, spec.embargo, spec.downsample, spec.compression, spec.encoding, spec.chunk) \
        == ((2.0, 0.5, 0.5), "labels", True, "stride", "zstd", "compressed_segmentation", (16, 32, 32))
    assert spec.path == str(tmp_path / "brain.tif") and spec.metadata == {}


def test_skeleton_source_fields_keep_their_values(tmp_path):
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(ONE + SKELETONS + 'units = "voxel"\noffset = [1, -2.5, 3]\nsoma_region = "VISp"\n')
    image, cells = load_catalog(catalog)
    assert (cells.kind, cells.space, cells.units, cells.offset) == ("skeletons", "brain", "voxel", (1.0, -2.5, 3.0))
    assert cells.path == str(tmp_path / "swc") and cells.metadata == {"soma_region": "VISp"}
    assert (image.space, image.units, image.offset) == (None, "micrometer", (0.0, 0.0, 0.0))
    catalog.write_text(ONE + SKELETONS)
    _, default = load_catalog(catalog)
    assert (default.units, default.offset) == ("micrometer", (0.0, 0.0, 0.0))


def test_load_catalog_raises_catalog_error_not_type_error(tmp_path):
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(ONE + "chunk = 64\n")
    with pytest.raises(CatalogError, match=r"chunk must be three positive integers"):
        load_catalog(catalog)


def _slices(directory, n):
    directory.mkdir()
    for z in range(n):
        (directory / f"z{z:03d}.tif").write_bytes(b"II*\0")
    return [str(directory / f"z{z:03d}.tif") for z in range(n)]


def test_an_expanded_glob_is_noticed(tmp_path):
    paths = _slices(tmp_path / "slices", 20)
    warning = expanded_glob_warning(paths[::-1])  # in any order
    assert warning is not None and "\n" not in warning
    assert warning.startswith("20 PATH arguments look like slices of one stack")
    assert f"({paths[0]} ... {paths[-1]})" in warning
    assert f"'{tmp_path / 'slices' / 'z*.tif'}'" in warning  # the glob to quote
    assert f"{tmp_path / 'slices'}/" in warning  # the directory holds nothing else: it will do too


def test_an_expanded_glob_among_other_files_is_noticed_without_the_directory(tmp_path):
    paths = _slices(tmp_path / "slices", 5)
    (tmp_path / "slices" / "overview.tif").write_bytes(b"II*\0")
    warning = expanded_glob_warning([str(tmp_path / "brain.ims"), *paths])
    assert warning is not None and warning.startswith("5 PATH arguments") and "directory" not in warning


def test_unrelated_files_and_directories_are_not_a_glob(tmp_path):
    for name in ("brain1.tif", "atlas.ome.tif"):
        (tmp_path / name).write_bytes(b"II*\0")
    assert expanded_glob_warning([str(tmp_path / "brain1.tif"), str(tmp_path / "atlas.ome.tif")]) is None
    _slices(tmp_path / "slices", 20)
    assert expanded_glob_warning([str(tmp_path / "slices")]) is None
    assert expanded_glob_warning([str(tmp_path / "slices" / "z*.tif")]) is None  # quoted: one PATH
    assert expanded_glob_warning([str(tmp_path / "slices" / "z000.tif"), str(tmp_path / "slices" / "z001.tif")]) is None
    assert expanded_glob_warning([]) is None


def test_a_selection_the_format_does_not_take_is_one_sentence(tmp_path):
    """`setup` names a BigDataViewer setup: on a TIFF it is a mistake, said at open (the dataset is
    reported unavailable with it, and every other dataset serves)."""
    import numpy as np
    import tifffile

    from bil_transform.readers import SourceError, open_source

    tifffile.imwrite(tmp_path / "brain.tif", np.zeros((2, 8, 8), np.uint16))
    with pytest.raises(SourceError) as caught:
        open_source(tmp_path / "brain.tif", selection={"setup": 1})
    assert str(caught.value) == (f"{tmp_path / 'brain.tif'}: setup = 1 names a setup (its tile, angle or illumination) "
                                 "of a BigDataViewer dataset (HDF5 or N5), and this is a tiff source; leave setup out")
