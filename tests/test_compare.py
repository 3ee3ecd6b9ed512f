"""``explorer compare``: models fitted on the bundled sample, a table printed and written as CSV and JSON."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from explorer import cli
from explorer.cli import EXIT_INPUT, main
from explorer.keys import Key

TRANSITIONS = "A_2>A_3,root_2>B_2"


def test_compare_end_to_end_on_the_sample(tmp_path, capsys, sample_adata):
    out = tmp_path / "table.csv"
    code = main(
        [
            "compare",
            "--models",
            "steady_state,stochastic",
            "--transitions",
            TRANSITIONS,
            "--out",
            str(out),
            "-q",
        ]
    )
    assert code == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "table_genes.csv" in captured.err
    assert "cbdir[A_2>A_3]" in printed
    assert "stochastic" in printed
    table = pd.read_csv(out, index_col="model")
    assert list(table.index) == ["steady_state", "stochastic"]
    payload = json.loads(out.with_suffix(".json").read_text())
    assert payload["transitions"] == ["A_2>A_3", "root_2>B_2"]
    for model in table.index:
        for key, value in payload["metrics"][model].items():
            if value is None:
                assert np.isnan(table.loc[model, key])
            else:
                assert table.loc[model, key] == pytest.approx(value)
    # the stochastic row is the sample's own fit (same model, seed and data): same confidence
    assert table.loc["stochastic", "velocity_confidence"] == pytest.approx(
        float(np.nanmean(sample_adata.obs[Key.obs.VELOCITY_CONFIDENCE])), abs=1e-5
    )
    assert table.loc["stochastic", "n_velocity_genes"] == int(sample_adata.var[Key.var.VELOCITY_GENES].sum())
    # CBDir of a real transition of the simulator is positive for both models
    assert (table["cbdir"] > 0).all()
    # each gene's term of each transition's CBDir: they sum to the table's CBDir
    genes = pd.read_csv(tmp_path / "table_genes.csv")
    assert list(genes.columns) == ["model", "transition", "gene", "term"]
    sums = genes.groupby(["model", "transition"])["term"].sum()
    for model in table.index:
        for transition in ("cbdir[A_2>A_3]", "cbdir[root_2>B_2]"):
            assert sums[(model, transition)] == pytest.approx(table.loc[model, transition], abs=1e-5)
    assert set(genes["gene"]) <= set(sample_adata.var_names)
    # a second run refuses to overwrite, and --force replaces both files
    code = main(["compare", "--models", "steady_state", "--out", str(out), "-q"])
    assert code == EXIT_INPUT
    assert "--force" in capsys.readouterr().err
    assert pd.read_csv(out, index_col="model").shape[0] == 2
    assert main(["compare", "--models", "steady_state", "--out", str(out), "-q", "--force"]) == 0
    assert list(pd.read_csv(out, index_col="model").index) == ["steady_state"]
    # with transitions, an existing gene-terms file is refused too
    out.with_suffix(".json").unlink()
    out.unlink()
    again = ["compare", "--models", "steady_state", "--transitions", TRANSITIONS, "--out", str(out), "-q"]
    assert main(again) == EXIT_INPUT
    assert "table_genes.csv" in capsys.readouterr().err
    assert not out.exists()
    assert not list(tmp_path.glob(".*tmp"))


@pytest.fixture
def no_reading(monkeypatch):
    def refuse(*_args, **_kwargs):
        pytest.fail("the input was read before the options were checked")

    monkeypatch.setattr(cli, "_load", refuse)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--models", "nope"], "unknown model(s) ['nope']"),
        (["--models", ","], "--models expects model names"),
        (["--models", "stochastic,stochastic"], "names a model twice"),
        (["--transitions", "A_2-A_3"], "SOURCE>TARGET"),
        (["--out", "table.txt"], "ending in .csv"),
        (["--out", "missing_dir/table.csv"], "does not exist"),
    ],
)
def test_bad_options_exit_2_before_reading(tmp_path, monkeypatch, capsys, no_reading, args, expected):
    monkeypatch.chdir(tmp_path)
    code = main(["compare", *args, "-q"])
    err = capsys.readouterr().err
    assert code == EXIT_INPUT
    assert expected in err
    assert "Traceback" not in err
    assert not list(tmp_path.glob("*.csv"))
    assert not list(tmp_path.glob("*.json"))


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--transitions", "A_2>Nowhere"], "does not have; its clusters are"),
        (["--cluster-key", "nope", "--transitions", "A_2>A_3"], "--cluster-key 'nope' is not an obs column"),
        (["--time-key", "nope"], "--time-key 'nope' is not an obs column"),
    ],
)
def test_bad_columns_exit_2_before_fitting(tmp_path, monkeypatch, capsys, args, expected):
    monkeypatch.chdir(tmp_path)

    def refuse(*_args, **_kwargs):
        pytest.fail("a model was fitted before the columns were checked")

    monkeypatch.setattr(cli, "run_velocity", refuse)
    code = main(["compare", "--models", "stochastic", *args, "-q"])
    err = capsys.readouterr().err
    assert code == EXIT_INPUT
    assert expected in err
    assert not list(tmp_path.glob("*.csv"))
