"""The app reads and writes only under its data directory, and a save never replaces a file unasked."""

from __future__ import annotations

import os

import pytest

from explorer._types import InputError
from explorer.app.files import ExistingFileError, export_target, list_datasets, resolve_under, write_new


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


# --------------------------------------------------------------------------- exports
def _write_text(text):
    def write(tmp):
        tmp.write_text(text)

    return write


def test_export_target_checks_the_name_before_any_work(data_dir):
    assert export_target(data_dir, "new.h5ad") == (data_dir / "new.h5ad").resolve()
    with pytest.raises(ExistingFileError, match="exists already") as err:
        export_target(data_dir, "a.h5ad")
    assert err.value.path == (data_dir / "a.h5ad").resolve()
    assert export_target(data_dir, "a.h5ad", overwrite=True) == (data_dir / "a.h5ad").resolve()
    (data_dir / "folder.h5ad").mkdir()
    with pytest.raises(InputError, match="is a folder"):
        export_target(data_dir, "folder.h5ad", overwrite=True)
    with pytest.raises(InputError, match="300 characters long"):
        export_target(data_dir, "x" * 295 + ".h5ad")
    with pytest.raises(InputError, match="does not exist"):
        export_target(data_dir, "missing/out.h5ad")
    with pytest.raises(InputError, match=r"ending in \.h5ad"):
        export_target(data_dir, "out.csv")
    with pytest.raises(InputError, match="input file"):
        export_target(data_dir, "a.h5ad", protect=[data_dir / "a.h5ad"], overwrite=True)
    # a link inside the folder names its target: replacing it needs the same confirmation
    with pytest.raises(ExistingFileError):
        export_target(data_dir, "inside_link.h5ad")


def test_write_new_never_replaces_a_file_unless_asked(data_dir):
    target = data_dir / "out.h5ad"
    assert write_new(_write_text("first"), target) == target
    assert target.read_text() == "first"
    assert target.stat().st_mode & 0o777 == 0o644
    with pytest.raises(ExistingFileError):
        write_new(_write_text("second"), target)
    assert target.read_text() == "first"
    target.chmod(0o640)
    write_new(_write_text("third"), target, overwrite=True)
    assert target.read_text() == "third"
    assert target.stat().st_mode & 0o777 == 0o640  # the replaced file's permissions are kept
    assert sorted(p.name for p in data_dir.iterdir() if p.name.startswith(".")) == []  # no temp left


def test_write_new_keeps_a_file_that_appears_while_writing(data_dir):
    """Another session saves the same name meanwhile: its file stays, and we say so."""
    target = data_dir / "race.h5ad"

    def write(tmp):
        tmp.write_text("ours")
        target.write_text("theirs")

    with pytest.raises(ExistingFileError, match="appeared"):
        write_new(write, target)
    assert target.read_text() == "theirs"
    assert [p for p in data_dir.iterdir() if p.name.startswith(".")] == []


def test_write_new_leaves_nothing_when_writing_fails(data_dir):
    target = data_dir / "broken.h5ad"

    def write(tmp):
        tmp.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        write_new(write, target)
    assert not target.exists()
    assert [p for p in data_dir.iterdir() if p.name.startswith(".")] == []
