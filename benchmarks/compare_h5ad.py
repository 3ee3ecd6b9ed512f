"""Compare two written ``.h5ad`` files entry by entry: are they the same bit for bit?

    python benchmarks/compare_h5ad.py before.h5ad after.h5ad

A speed change that must not change numbers is checked with it: the same command on the
same input, by the code before and after, and every group, dataset (values, dtype, shape,
NaN positions and the sign of zeros) and attribute of the two files compared. Prints each
difference (for a float dataset with its largest absolute difference) and a last line
``N differences of M entries``; exits 1 when there is any difference.
"""

from __future__ import annotations

import argparse
import sys

import h5py
import numpy as np


def _entries(f: h5py.File) -> dict[str, h5py.Group | h5py.Dataset]:
    out: dict[str, h5py.Group | h5py.Dataset] = {"/": f}
    f.visititems(lambda name, obj: out.__setitem__(name, obj))
    return out


def _same_values(x: np.ndarray, y: np.ndarray) -> bool:
    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    if x.dtype.kind in "fc":
        return np.array_equal(x, y, equal_nan=True) and np.array_equal(np.signbit(x.real), np.signbit(y.real))
    return np.array_equal(x, y)


def _same_attrs(a: h5py.AttributeManager, b: h5py.AttributeManager) -> bool:
    if set(a) != set(b):
        return False
    return all(_same_values(np.asarray(a[n]), np.asarray(b[n])) for n in a)


def compare(path_a: str, path_b: str) -> tuple[list[str], int]:
    """Return the differences between two HDF5 files and the number of entries compared."""
    differences = []
    with h5py.File(path_a, "r") as fa, h5py.File(path_b, "r") as fb:
        ea, eb = _entries(fa), _entries(fb)
        names = sorted(set(ea) | set(eb))
        for name in names:
            if name not in ea or name not in eb:
                differences.append(f"only in {'the first' if name in ea else 'the second'}: {name}")
                continue
            x, y = ea[name], eb[name]
            if not _same_attrs(x.attrs, y.attrs):
                differences.append(f"attributes differ: {name}")
            if isinstance(x, h5py.Dataset) != isinstance(y, h5py.Dataset):
                differences.append(f"a dataset in one file, a group in the other: {name}")
            elif isinstance(x, h5py.Dataset):
                vx, vy = np.asarray(x[()]), np.asarray(y[()])
                if not _same_values(vx, vy):
                    detail = f"{vx.dtype} {vx.shape} against {vy.dtype} {vy.shape}"
                    if vx.shape == vy.shape and vx.dtype.kind in "fiu" and vy.dtype.kind in "fiu" and vx.size:
                        detail += f", largest difference {np.nanmax(np.abs(vx.astype(float) - vy.astype(float))):.3g}"
                    differences.append(f"values differ: {name} ({detail})")
    return differences, len(names)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("first")
    parser.add_argument("second")
    args = parser.parse_args(argv)
    differences, n = compare(args.first, args.second)
    for line in differences:
        print(line)
    print(f"{len(differences)} differences of {n} entries")
    return 1 if differences else 0


if __name__ == "__main__":
    sys.exit(main())
