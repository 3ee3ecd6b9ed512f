"""The app reads and writes only under its data directory."""

from __future__ import annotations

import os

import pytest

from explorer._types import InputError
from explorer.app.files import list_datasets, resolve_under


@pytest.fixture
def data_dir(tmp_path):
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    (root / "a.h5ad").write_bytes(b"")
    (root / "sub" / "b.loom").write_bytes(b"")
    (root / "notes.txt").write_text("x")
    outside = tmp_path / "secret.h5ad"
    outside.write_bytes(b"")
    os.symlink(outside, root / "link.h5ad")
    os.symlink(root / "a.h5ad", root / "inside_link.h5ad")
    return root


def test_resolve_accepts_names_inside(data_dir):
    assert resolve_under(data_dir, "a.h5ad") == (data_dir / "a.h5ad").resolve()
    assert resolve_under(data_dir, "sub/b.loom") == (data_dir / "sub" / "b.loom").resolve()
    # a link that stays inside is fine: it resolves to its target
    assert resolve_under(data_dir, "inside_link.h5ad") == (data_dir / "a.h5ad").resolve()


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("../secret.h5ad", "'..'"),
        ("sub/../../secret.h5ad", "'..'"),
        ("/etc/passwd", "absolute"),
        ("~/x.h5ad", "absolute"),
        ("link.h5ad", "outside"),
        ("  ", "empty"),
    ],
)
def test_resolve_rejects_paths_that_leave(data_dir, name, words):
    with pytest.raises(InputError, match=words):
        resolve_under(data_dir, name)


def test_list_datasets_offers_only_datasets_inside(data_dir):
    assert list_datasets(data_dir) == ["a.h5ad", "inside_link.h5ad", "sub/b.loom"]
    assert list_datasets(data_dir / "missing") == []
