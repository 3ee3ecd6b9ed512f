"""Where the sample files live and how they are found: inside the package, so a wheel ships them.

The files are package data in ``explorer/sample_data/``; ``sample_data/`` at the top of the
repository is a link to that folder. ``sample_path`` looks them up with
:mod:`importlib.resources`, which is what works from an installed wheel.
"""

from __future__ import annotations

import fnmatch
import tomllib
from importlib.resources import files
from pathlib import Path

import pytest

import explorer
from explorer._samples_build import make_samples
from explorer._types import InputError
from explorer.data.samples import SAMPLES, sample_dir, sample_path

ROOT = Path(__file__).resolve().parents[2]


def test_lookup_finds_the_files_through_the_installed_package():
    package_dir = Path(explorer.__file__).resolve().parent
    resources = files("explorer").joinpath("sample_data")
    assert sample_dir() == resources
    for name, file_name in SAMPLES.items():
        path = sample_path(name)
        assert path.is_file()
        assert path.resolve() == package_dir / "sample_data" / file_name
        assert path.stat().st_size > 100_000  # a real .h5ad, not a pointer or an empty stub


def test_repository_sample_data_is_the_package_folder():
    """``sample_data/`` stays visible at the repository root and is the same files, not copies."""
    top = ROOT / "sample_data"
    assert top.is_dir()
    for file_name in SAMPLES.values():
        assert (top / file_name).samefile(sample_dir() / file_name)
    assert (top / "README.md").samefile(sample_dir() / "README.md")


def test_package_data_declares_every_sample_file():
    """pyproject's package-data globs match every sample file, so ``pip wheel .`` packs them.

    Checked by building the wheel too (``.venv/bin/pip wheel . --no-deps -w /tmp/whl``: the
    wheel holds ``explorer/sample_data/default.h5ad``; README, "Packaging").
    """
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["explorer"]
    for file_name in [*SAMPLES.values(), "README.md"]:
        rel = f"sample_data/{file_name}"
        assert any(fnmatch.fnmatch(rel, p) for p in patterns), f"{rel} is not in package-data {patterns}"


def test_unknown_sample_names_the_valid_ones():
    with pytest.raises(InputError, match="Invalid sample 'pancreas'. Valid options are: 'default'"):
        sample_path("pancreas")


@pytest.mark.slow
def test_rebuilding_the_sample_gives_the_same_file(tmp_path):
    """``python -m explorer.data.samples`` is deterministic: the rebuild is the stored file, byte for byte.

    If this fails after a change to the simulator, the preprocessing or the stochastic
    model, regenerate the sample with ``python -m explorer.data.samples``.
    """
    (written,) = make_samples(tmp_path, names=["default"])
    assert written.read_bytes() == sample_path("default").read_bytes()
