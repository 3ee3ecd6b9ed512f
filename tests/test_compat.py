"""Our output opens in the real scVelo and CellRank.

Runs in the interpreter named by ``EXPLORER_COMPAT_PYTHON`` (a separate virtual
environment with ``scvelo-modern`` and ``cellrank``, made by ``.ci/setup``; they are never
dependencies of explorer). There, scVelo draws ``velocity_embedding_stream`` from our file,
CellRank builds its ``VelocityKernel`` from it, and scVelo recomputes the velocity graph
from our velocity, which must agree with ours.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from explorer.data.io import read, write
from explorer.pipeline import run_velocity

_DEFAULT = Path(__file__).resolve().parent.parent / ".venv-compat" / "bin" / "python"
COMPAT_PYTHON = os.environ.get("EXPLORER_COMPAT_PYTHON") or (str(_DEFAULT) if _DEFAULT.exists() else None)

#: run before ``import cellrank`` in every script for .venv-compat: CellRank 2.0.7 (the last
#: release for Python 3.11) calls assert_array_equal(x=..., y=...), names numpy 2 no longer
#: accepts; map them so its kernels run at all
CELLRANK_NUMPY2_SHIM = r"""
import numpy as np
_assert_equal = np.testing.assert_array_equal
def _assert_equal_compat(*args, x=None, y=None, **kwargs):
    return _assert_equal(x, y, **kwargs) if x is not None else _assert_equal(*args, **kwargs)
np.testing.assert_array_equal = _assert_equal_compat
"""

SCRIPT = r"""
import json, sys, warnings
warnings.filterwarnings("ignore")
import matplotlib
matplotlib.use("Agg")
import numpy as np, anndata as ad, scvelo as scv
""" + CELLRANK_NUMPY2_SHIM + r"""
import cellrank as cr
path, png = sys.argv[1], sys.argv[2]
a = ad.read_h5ad(path)
ax = scv.pl.velocity_embedding_stream(a, basis="umap", color="clusters", show=False)
ax.figure.savefig(png)
n_stream = sum(len(c.get_paths()) for c in ax.collections)
vk = cr.kernels.VelocityKernel(a).compute_transition_matrix()
T = vk.transition_matrix
b = a.copy()
scv.tl.velocity_graph(b, n_jobs=1)
theirs = b.uns["velocity_graph"].tocsr()
ours = a.obsp["velocity_graph"].tocsr()
common = theirs.multiply(ours != 0)
m = (ours != 0).multiply(theirs != 0).tocoo()
x = np.asarray(ours[m.row, m.col]).ravel(); y = np.asarray(theirs[m.row, m.col]).ravel()
c = a.copy()
del c.obsm["velocity_umap"]
scv.tl.velocity_embedding(c, basis="umap")  # needs uns['velocity_graph']: explorer's write mirrors it there
vo, vt = a.obsm["velocity_umap"], c.obsm["velocity_umap"]
cos = (vo * vt).sum(1) / (np.linalg.norm(vo, axis=1) * np.linalg.norm(vt, axis=1) + 1e-12)
print(json.dumps({
    "embedding_cos_median": float(np.median(cos)),
    "n_stream_paths": int(n_stream),
    "T_shape": list(T.shape),
    "T_row_sum_min": float(np.asarray(T.sum(1)).min()),
    "T_row_sum_max": float(np.asarray(T.sum(1)).max()),
    "graph_corr": float(np.corrcoef(x, y)[0, 1]),
    "graph_shared_edges": int(m.nnz),
    "graph_edges_ours": int(ours.nnz),
    "graph_edges_theirs": int(theirs.nnz),
}))
"""


@pytest.mark.slow
@pytest.mark.skipif(
    COMPAT_PYTHON is None, reason="no .venv-compat (made by .ci/setup) and EXPLORER_COMPAT_PYTHON not set"
)
def test_scvelo_and_cellrank_read_our_file(tmp_path, shared_data):
    adata = read(shared_data / "pancreas_endocrinogenesis_3696.h5ad")
    run_velocity(adata, model="stochastic")
    path = write(adata, tmp_path / "pancreas_stochastic.h5ad")
    png = tmp_path / "stream.png"
    proc = subprocess.run(
        [COMPAT_PYTHON, "-c", SCRIPT, str(path), str(png)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert png.stat().st_size > 10_000
    assert res["n_stream_paths"] > 0
    assert res["T_shape"] == [adata.n_obs, adata.n_obs]
    assert np.isclose(res["T_row_sum_min"], 1, atol=1e-4) and np.isclose(res["T_row_sum_max"], 1, atol=1e-4)
    # scVelo's own velocity graph from our velocity agrees with the graph we wrote
    assert res["graph_shared_edges"] > 0.9 * res["graph_edges_ours"]
    assert res["graph_corr"] > 0.95, res
    # scVelo's own projection from the graph we wrote points where ours does
    assert res["embedding_cos_median"] > 0.99, res
