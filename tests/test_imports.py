"""The package's import graph: no cycles, imports only go downhill, heavy libraries stay lazy.

Every module under ``explorer/`` is parsed with :mod:`ast` (nothing is imported), and
every ``import``/``from ... import`` in it counts, at module level or inside a function,
``TYPE_CHECKING`` blocks included: a function-level import still fixes a direction. The
layers, from the bottom:

``_types``, ``_version``, ``_process``, ``keys`` -> ``kinetics`` -> ``data``, ``graph``
-> ``models`` -> the package's public API (``explorer/__init__.py``), ``pipeline`` ->
``app``, ``_samples_build`` -> ``cli``.

A module may import its own layer and the layers below it, and ``data`` and ``graph``
are peers that do not import each other. The ``if __name__ == "__main__":`` block of a
module is a program, not part of the module: its imports are checked as the CLI's
(``python -m explorer.data.samples`` builds the samples with the pipeline). What actually
loads is checked in fresh interpreters: the core never loads Panel, and torch loads only
with the models' tensor code.

Run it alone with ``.venv/bin/python -m pytest tests/test_imports.py -q``.
"""

from __future__ import annotations

import ast
import functools
import gc
import json
import os
import platform
import re
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "explorer"

#: layer -> rank; a module may import modules of a lower rank, and of its own layer
RANKS: dict[str, int] = {
    "_types": 0,
    "_version": 0,
    "_process": 0,
    "keys": 1,
    "kinetics": 2,
    "data": 3,
    "graph": 3,
    "models": 4,
    "explorer": 5,  # explorer/__init__.py: the public API, re-exports only
    "pipeline": 5,
    "diagnostics": 5,  # per-gene trust diagnostics: reads fits, refits models (stability)
    "stream": 5,  # the dynamical fit streamed over gene blocks, optionally on Dask
    "app": 6,
    "_samples_build": 6,
    "cli": 7,
    "__main__": 7,  # the ``if __name__ == "__main__":`` block of a module
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(node: ast.ImportFrom, module: str, is_package: bool, known: set[str]) -> list[str]:
    """The explorer modules a ``from ... import ...`` loads (``from explorer import kinetics``: kinetics)."""
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        source = ".".join([*base, node.module] if node.module else base)
    else:
        source = node.module or ""
    if source != "explorer" and not source.startswith("explorer."):
        return []
    targets = []
    for alias in node.names:
        sub = f"{source}.{alias.name}"
        targets.append(sub if sub in known else source)
    return targets


def _is_main_guard(node: ast.AST) -> bool:
    """``if __name__ == "__main__":``."""
    if not isinstance(node, ast.If) or not isinstance(node.test, ast.Compare):
        return False
    sides = [node.test.left, *node.test.comparators]
    return any(isinstance(x, ast.Name) and x.id == "__name__" for x in sides) and any(
        isinstance(x, ast.Constant) and x.value == "__main__" for x in sides
    )


def _edges(nodes: list[ast.AST], name: str, is_package: bool, known: set[str]) -> set[str]:
    edges: set[str] = set()
    for top in nodes:
        for node in ast.walk(top):
            if isinstance(node, ast.Import):
                edges.update(
                    a.name for a in node.names if a.name == "explorer" or a.name.startswith("explorer.")
                )
            elif isinstance(node, ast.ImportFrom):
                edges.update(_resolve(node, name, is_package, known))
    edges.discard(name)
    return edges


@functools.cache
def import_graph() -> dict[str, set[str]]:
    """Module -> the explorer modules it imports anywhere in its source.

    A module's ``if __name__ == "__main__":`` block is the node ``<module>:__main__``.
    """
    modules = _modules()
    known = set(modules)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        body = ast.parse(path.read_text(), filename=str(path)).body
        is_package = path.name == "__init__.py"
        main = [n for n in body if _is_main_guard(n)]
        graph[name] = _edges([n for n in body if not _is_main_guard(n)], name, is_package, known)
        if main:
            graph[f"{name}:__main__"] = _edges(main, name, is_package, known)
    for name, edges in graph.items():
        unknown = {e for e in edges if e not in known}
        assert not unknown, f"{name} imports {sorted(unknown)}, which are not modules of the package"
    return graph


def layer(module: str) -> str:
    """``explorer.graph.moments`` -> ``graph``; ``explorer`` (the package's ``__init__``) -> ``explorer``."""
    if module.endswith(":__main__"):
        return "__main__"
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "explorer"


def test_every_module_has_a_layer():
    missing = sorted({layer(m) for m in import_graph()} - set(RANKS))
    assert not missing, f"modules outside the known layers: {missing}; add them to RANKS"


def test_the_graph_sees_function_level_imports():
    """The parser finds what it must: a known downhill edge, and a known package-relative one."""
    graph = import_graph()
    assert "explorer.keys" in graph["explorer.kinetics"]
    assert "explorer.models.base" in graph["explorer.models"]
    assert "explorer.pipeline" in graph["explorer.cli"]
    assert "explorer._samples_build" in graph["explorer.data.samples:__main__"]
    assert "explorer._samples_build" not in graph["explorer.data.samples"]


def test_no_import_cycles():
    graph = import_graph()
    cycles = []
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_imports_go_downhill():
    uphill = []
    for module, targets in import_graph().items():
        src = layer(module)
        for target in targets:
            dst = layer(target)
            if dst == src:
                continue
            if RANKS[dst] >= RANKS[src]:
                uphill.append(f"{module} ({src}) -> {target} ({dst})")
    assert not uphill, "imports that climb or cross between peers:\n" + "\n".join(sorted(uphill))


@pytest.mark.parametrize(
    ("src", "dst"),
    [("data", "models"), ("data", "pipeline"), ("data", "graph"), ("graph", "models"), ("graph", "data")],
)
def test_named_directions_are_absent(src, dst):
    """The directions the issue names, spelled out (also implied by the ranks)."""
    bad = [
        f"{m} -> {t}"
        for m, targets in import_graph().items()
        if layer(m) == src
        for t in targets
        if layer(t) == dst
    ]
    assert not bad


def test_only_model_files_import_torch():
    """Torch is tensor code of the models; data, graph, pipeline and the CLI never name it."""
    offenders = []
    for name, path in _modules().items():
        if layer(name) in {"models", "app"}:
            continue  # models: their tensor code; app: checked by the app's own tests
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            if any(n == "torch" or n.startswith("torch.") for n in names):
                offenders.append(name)
    assert not offenders, f"modules outside explorer.models that import torch: {sorted(set(offenders))}"


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


#: installed by .ci/setup with ``pip install --no-deps`` (see there why), so not in pyproject.toml
_INSTALLED_WITHOUT_PINS = {"pygpcca": Path(__file__).resolve().parents[1] / ".ci" / "setup"}


def test_every_imported_library_is_declared():
    """Each third-party package imported anywhere under ``explorer/`` is a dependency in pyproject.toml.

    Except those .ci/setup installs without their pins (:data:`_INSTALLED_WITHOUT_PINS`),
    which it must then name.
    """
    imported: dict[str, str] = {}
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                tops = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                tops = [node.module.split(".")[0]]
            else:
                continue
            for top in tops:
                if top != "explorer" and top not in sys.stdlib_module_names:
                    imported.setdefault(top, name)
    config = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())
    dependencies = config["project"]["dependencies"]
    declared = {_normalise(re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0]) for d in dependencies}
    providers = packages_distributions()
    missing = {
        top: module
        for top, module in imported.items()
        if not {_normalise(d) for d in providers.get(top, [top])} & declared
    }
    assert {"numpy", "scanpy", "torch", "panel"} <= set(imported)  # the scan sees the imports
    for top, setup in _INSTALLED_WITHOUT_PINS.items():
        if missing.pop(top, None) is not None:
            assert f"--no-deps \"{top}==" in setup.read_text(), f"{top} is neither declared nor installed by {setup}"
    assert not missing, f"imported but not declared in pyproject.toml (package: first importer): {missing}"


def _loaded_after(*statements: str) -> list[set[str]]:
    """Top-level packages in ``sys.modules`` after each of ``statements``, run in one fresh interpreter.

    Imports only add modules, so what is loaded after statement ``k`` includes all that
    statement ``k`` would load alone: one interpreter checks them all.
    """
    lines = ["import sys, json", "seen = []"]
    for statement in statements:
        lines += [statement, "seen.append(sorted({m.split('.')[0] for m in sys.modules}))"]
    lines.append("print(json.dumps(seen))")
    command = [sys.executable, "-c", "\n".join(lines)]
    out = subprocess.run(command, capture_output=True, text=True, check=False, cwd=PACKAGE.parent)
    assert out.returncode == 0, f"exit code {out.returncode}; stderr:\n{out.stderr[-4000:]}"
    return [set(x) for x in json.loads(out.stdout.strip().splitlines()[-1])]


HEAVY = {"torch", "panel", "holoviews", "bokeh"}

#: in this order, in one interpreter: none may load a library of :data:`HEAVY`
CORE = (
    "import explorer",
    "import explorer.data",
    "import explorer.graph",
    "import explorer.data.io, explorer.data.preprocess, explorer.data.simulate, explorer.data.samples",
    "import explorer.graph.neighbors, explorer.graph.moments, explorer.graph.transition",
    "import explorer.pipeline",
    "import explorer.cli",
    "from explorer.models import MODELS; MODELS['stochastic']; MODELS['dynamical']",
)


def test_core_loads_no_torch_and_no_panel():
    """``import explorer``, ``explorer.data``, ``explorer.graph``, the pipeline and the CLI load neither."""
    found = {
        statement: sorted(loaded & HEAVY)
        for statement, loaded in zip(CORE, _loaded_after(*CORE), strict=True)
        if loaded & HEAVY
    }
    assert not found, f"heavy libraries loaded (cumulatively, first offender first): {found}"


def test_the_tensor_code_does_load_torch():
    """The check above can fail: VeloVAE's network is torch code."""
    assert "torch" in _loaded_after("import explorer.models._vae_module")[0]


@pytest.fixture(scope="module")
def small_h5ad(tmp_path_factory) -> Path:
    """A small preprocessed simulation on disk, written by this process (which may load anything)."""
    from explorer.data.simulate import simulate
    from explorer.pipeline import prepare

    adata = simulate(n_obs=300, n_vars=40, seed=0)
    prepare(adata)
    path = tmp_path_factory.mktemp("imports") / "small.h5ad"
    adata.write_h5ad(path)
    return path


def _fit_command_loads(path: Path, *, before: str = "") -> set[str]:
    """Top-level packages loaded by ``explorer fit PATH --model dynamical``, in a fresh interpreter."""
    out = path.with_name("out.h5ad")
    args = ["fit", str(path), "--model", "dynamical", "--out", str(out), "--force", "--quiet"]
    statement = f"{before}\nfrom explorer.cli import main\nassert main({args!r}) == 0"
    return _loaded_after(statement)[0]


def test_dynamical_fit_command_on_the_cpu_loads_no_torch(small_h5ad):
    """The whole ``explorer fit --model dynamical`` on the CPU: numpy around the compiled kernels, no torch.

    Importing torch is about 1.4 s of CPU, a quarter of the command on the pancreas.
    """
    loaded = _fit_command_loads(small_h5ad)
    assert not loaded & HEAVY, f"`explorer fit --model dynamical` loaded {sorted(loaded & HEAVY)}"
    assert "numba" in loaded  # it did run the compiled kernels


def test_dynamical_fit_command_with_the_torch_backend_loads_torch(small_h5ad):
    """The check above can fail: the same command on the torch code (the CUDA path's) loads it."""
    before = "import explorer.models.dynamical as d; d.CPU_BACKEND = 'torch'"
    assert "torch" in _fit_command_loads(small_h5ad, before=before)


def test_app_state_loads_no_panel():
    loaded = _loaded_after("import explorer.app.state")[0] & {"panel", "holoviews", "bokeh"}
    assert not loaded, f"`import explorer.app.state` loaded {sorted(loaded)}"


def test_in_memory_fit_is_told_from_the_command_line():
    from explorer._process import is_in_memory_fit

    assert is_in_memory_fit(["/venv/bin/explorer", "-v", "fit", "a.h5ad", "--model", "dynamical"])
    assert is_in_memory_fit(["/repo/explorer/cli.py", "fit", "a.h5ad"])
    for argv in (
        ["/venv/bin/explorer", "fit", "atlas.zarr"],
        ["/venv/bin/explorer", "fit", "atlas.zarr/", "--model", "dynamical"],
        ["/venv/bin/explorer", "fit", "a.h5ad", "--stream"],
        ["/venv/bin/explorer", "fit", "a.h5ad", "--sched", "tcp://h:8786"],  # argparse's prefixes
        ["/venv/bin/explorer", "fit", "a.h5ad", "--workers=2"],
        ["/venv/bin/explorer", "serve", "a.h5ad"],
        ["/venv/bin/explorer"],
        ["pytest", "fit", "a.h5ad"],  # a program that imports the CLI
        [],
    ):
        assert not is_in_memory_fit(argv), argv


def test_fit_command_imports_anndata_without_dask(small_h5ad):
    """``explorer fit`` in memory: anndata loads without dask.array, xarray and zarr (0.6 s of CPU).

    The same process run as another program (here ``python -c``) loads them as usual,
    so the check can fail.
    """
    out = small_h5ad.with_name("out_lean.h5ad")
    args = ["fit", str(small_h5ad), "--model", "dynamical", "--out", str(out), "--force", "--quiet"]
    as_command = (
        f"sys.argv = ['explorer', *{args!r}]\nfrom explorer.cli import main\nassert main(sys.argv[1:]) == 0"
    )
    (lean,) = _loaded_after(as_command)
    optional = {"dask", "xarray", "zarr", "numcodecs"}
    assert not lean & optional, sorted(lean & optional)
    assert "anndata" in lean
    assert optional <= _loaded_after("from explorer.cli import main")[0]


def test_lean_anndata_import_leaves_the_real_zarr_to_later_imports():
    """After the lean import, anndata knows no zarr type, and ``import zarr`` loads the real zarr.

    In a fresh interpreter, as the console command imports anndata.
    """
    statement = """
import sys
from explorer._process import lean_anndata_import
with lean_anndata_import(["explorer", "fit", "a.h5ad"]):
    import anndata
assert "zarr" not in sys.modules, "the stand-in stayed"
from anndata.compat import ZarrArray, ZarrGroup
assert ZarrArray.__module__ == ZarrGroup.__module__ == "zarr", (ZarrArray, ZarrGroup)
import zarr
assert hasattr(zarr, "open_group") and zarr.Array is not ZarrArray, zarr
print("OK")
"""
    command = [sys.executable, "-c", statement]
    out = subprocess.run(command, capture_output=True, text=True, check=False, cwd=PACKAGE.parent)
    assert out.returncode == 0, f"exit code {out.returncode}; stderr:\n{out.stderr[-4000:]}"
    assert out.stdout.strip() == "OK"


def test_an_anndata_the_stand_in_does_not_fit_is_imported_whole():
    """Should anndata need more of zarr than the stand-in gives, the command still starts.

    In a fresh interpreter, with a stand-in that lacks ``Group`` (as a release needing
    another zarr name would find it): anndata's import fails under it, and
    ``import_anndata`` drops the partial import and loads anndata with the real zarr.
    """
    statement = """
import sys, types
import explorer._process as process
process._zarr_stand_in = lambda: types.ModuleType("zarr")
anndata = process.import_anndata(["explorer", "fit", "a.h5ad"])
from anndata.compat import ZarrArray
import zarr
assert ZarrArray is zarr.Array, ZarrArray
assert anndata.AnnData is sys.modules["anndata"].AnnData
print("OK")
"""
    command = [sys.executable, "-c", statement]
    out = subprocess.run(command, capture_output=True, text=True, check=False, cwd=PACKAGE.parent)
    assert out.returncode == 0, f"exit code {out.returncode}; stderr:\n{out.stderr[-4000:]}"
    assert out.stdout.strip() == "OK"


def test_set_up_process_bounds_the_openmp_spin_and_keeps_the_users_choice():
    """Before torch loads: a spin count of 10,000, no wait policy; a policy or count the user set stays.

    In fresh interpreters (the settings are read when the OpenMP runtime loads). Passive
    waiting halved VeloVAE's speed (see ``set_up_process``), so no policy is set.
    """
    statement = """
import os, sys
import explorer._process as process
process.set_up_process()
print(os.environ.get("GOMP_SPINCOUNT"), os.environ.get("OMP_WAIT_POLICY"))
"""
    cases = [({}, "10000 None"), ({"OMP_WAIT_POLICY": "ACTIVE"}, "None ACTIVE"), ({"GOMP_SPINCOUNT": "5"}, "5 None")]
    for extra, expected in cases:
        env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
        out = subprocess.run(
            [sys.executable, "-c", statement], capture_output=True, text=True, check=False,
            cwd=PACKAGE.parent, env={**env, **extra},
        )
        assert out.returncode == 0, f"exit code {out.returncode}; stderr:\n{out.stderr[-4000:]}"
        assert out.stdout.strip() == expected, (extra, out.stdout)


#: the page-fault tests measure glibc's malloc (a mark on the helper itself would skip nothing)
glibc_only = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only"
)


def _faults_by_mode(statement: str, modes: tuple[str, ...], *args: str) -> dict[str, int]:
    """Run ``statement`` in a fresh interpreter once per mode (``sys.argv[1]``); the count each prints."""
    faults = {}
    for mode in modes:
        command = [sys.executable, "-c", statement, mode, *args]
        out = subprocess.run(command, capture_output=True, text=True, check=False, cwd=PACKAGE.parent)
        assert out.returncode == 0, f"exit code {out.returncode}; stderr:\n{out.stderr[-4000:]}"
        faults[mode] = int(out.stdout.strip())
    return faults


@glibc_only
def test_keep_freed_memory_reuses_freed_blocks():
    """After ``keep_freed_memory``, arrays of 9-25 MB freed and made again touch no fresh page.

    In fresh interpreters (the setting is process-wide), without numpy's huge pages (as
    in ``explorer fit``): with glibc's defaults each new largest block is a fresh
    ``mmap``, returned to the kernel when freed, so the second round faults on most of
    its pages again (6,361 of 6,400 when written); with the setting the first round's
    blocks are reused (0).
    """
    statement = """
import resource, sys
import numpy as np
from explorer._process import _numpy_hugepage_switch, keep_freed_memory
_numpy_hugepage_switch()(False)  # as inside fit_settings: 4 kB pages, counted one by one
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def round_():
    for mb in (9, 17, 25):
        a = np.ones(mb << 18, dtype=np.float32)
        del a
round_()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
round_()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    faults = _faults_by_mode(statement, ("default", "keep"))
    pages = (25 << 20) // 4096
    assert faults["default"] > pages // 2, faults  # the check below can fail
    assert faults["keep"] < pages // 20, faults


@glibc_only
def test_prepare_heap_touches_pages_ahead_for_every_thread(tmp_path):
    """After ``prepare_heap`` (and its thread), arrays made in two threads touch no fresh page.

    In fresh interpreters (the settings are process-wide), without numpy's huge pages (as
    in ``explorer fit``), for a 40 MB input file (200 MB touched ahead): with glibc's
    defaults a 25 MB array in the main thread and a 17 MB one in a second thread fault on
    every page they write; after ``prepare_heap`` both come from the touched heap (the
    second thread's through the one arena: without it, it faults on all 4,352 pages). The
    heap is sized by the input file, not by ``--out``'s. On a machine of more cores than
    ``_ONE_ARENA_MAX_CPUS`` glibc's arenas are kept: the main thread's array still reuses
    the touched heap, the second thread's does not (the limit is set in the child, so the
    test does not depend on this machine's cores).
    """
    data = tmp_path / "in.h5ad"
    with data.open("wb") as fh:
        fh.truncate(40 << 20)  # only its size counts
    big_out = tmp_path / "old_out.h5ad"
    with big_out.open("wb") as fh:
        fh.truncate(400 << 20)
    statement = """
import resource, sys, threading
import numpy as np  # loaded before prepare_heap, as in the command (by explorer's __init__)
import explorer._process as process
from explorer._process import _input_bytes, _numpy_hugepage_switch, prepare_heap
argv = ["explorer", "fit", sys.argv[2], "--out", sys.argv[3], "--model", "dynamical"]
assert _input_bytes(argv) == 40 << 20, _input_bytes(argv)
# "prepare": a machine of few cores (one arena); "many": of more than the limit
process._ONE_ARENA_MAX_CPUS = 0 if sys.argv[1] == "many" else 10**6
if sys.argv[1] in ("prepare", "many"):
    thread = prepare_heap(argv)
    assert thread is not None
    thread.join()
    assert prepare_heap(argv) is None  # once per process
_numpy_hugepage_switch()(False)  # as inside fit_settings: 4 kB pages, counted one by one
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
a = np.ones(25 << 18, dtype=np.float32)
other = threading.Thread(target=lambda: np.ones(17 << 18, dtype=np.float32).sum())
other.start()
other.join()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    faults = _faults_by_mode(statement, ("default", "prepare", "many"), str(data), str(big_out))
    pages = (42 << 20) // 4096
    assert faults["default"] > pages // 2, faults  # the check below can fail
    assert faults["prepare"] < pages // 20, faults
    second = (17 << 20) // 4096
    assert second // 2 < faults["many"] < second + pages // 20, faults


#: environment variables that cap a BLAS or OpenMP library's threads
_THREAD_LIMITS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
                  "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")  # fmt: skip


def test_fit_settings_limit_blas_and_huge_pages_and_put_them_back():
    """Inside ``fit_settings`` every loaded BLAS has one thread and numpy asks for no huge pages.

    Run in a fresh interpreter (the settings are process-wide): before, the BLAS libraries
    keep their thread counts (two or more on a multi-core machine) and numpy its default;
    after the block, both are as they were.
    """
    statement = """
from threadpoolctl import threadpool_info
from explorer._process import _numpy_hugepage_switch, fit_settings
def blas():
    return sorted((i["filepath"], i["num_threads"]) for i in threadpool_info() if i["user_api"] == "blas")
switch = _numpy_hugepage_switch()
assert switch is not None, "numpy has no _set_madvise_hugepage"
huge = switch(True); switch(huge)
with fit_settings():
    inside, huge_inside = blas(), switch(False)
after, huge_after = blas(), switch(huge)
assert {n for _, n in inside} == {1}, inside
assert len(inside) >= 2, inside  # numpy's OpenBLAS and scipy's own (scipy.linalg loaded by the block)
assert not huge_inside and huge_after == huge, (huge, huge_inside, huge_after)
print("BLAS", json.dumps(after))
"""
    lines = ["import json", statement]
    command = [sys.executable, "-c", "\n".join(lines)]
    # the BLAS libraries' own defaults: a thread limit in this process's environment (a Dask
    # cluster started by an earlier test leaves OMP_NUM_THREADS=1 and its like) would make
    # the child's "before" one thread already
    env = {k: v for k, v in os.environ.items() if k not in _THREAD_LIMITS}
    out = subprocess.run(command, capture_output=True, text=True, check=False, cwd=PACKAGE.parent, env=env)
    assert out.returncode == 0, f"exit code {out.returncode}; stderr:\n{out.stderr[-4000:]}"
    after = json.loads(out.stdout.split("BLAS", 1)[1])
    if (os.cpu_count() or 1) > 1:
        assert {n for _, n in after} != {1}, after  # put back: the check above can fail


def test_collector_paused_restores_the_collector_and_freezes_on_request():
    from explorer._process import collector_paused

    assert gc.isenabled()
    frozen = gc.get_freeze_count()
    with collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    assert gc.get_freeze_count() == frozen
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()  # a collector that was off stays off
    finally:
        gc.enable()
    try:
        with collector_paused(freeze=True):
            kept = [[]]  # noqa: F841  (an object made inside the block)
        assert gc.get_freeze_count() > frozen
    finally:
        gc.unfreeze()


def test_fit_command_freezes_its_modules_only_as_the_console_command(small_h5ad):
    """The console fit takes its modules out of the collector's reach; a program importing the CLI not."""
    out = small_h5ad.with_name("out_frozen.h5ad")
    args = ["fit", str(small_h5ad), "--model", "dynamical", "--out", str(out), "--force", "--quiet"]
    check = "import gc; print('FROZEN', gc.get_freeze_count(), gc.isenabled())"
    for argv0, frozen in (("explorer", True), ("python", False)):
        lines = [f"import sys; sys.argv = [{argv0!r}, *{args!r}]", "import explorer.cli", check]
        command = [sys.executable, "-c", "\n".join(lines)]
        run = subprocess.run(command, capture_output=True, text=True, check=False, cwd=PACKAGE.parent)
        assert run.returncode == 0, run.stderr[-4000:]
        count, enabled = run.stdout.split("FROZEN", 1)[1].split()
        assert (int(count) > 0) is frozen, (argv0, count)
        assert enabled == "True"
