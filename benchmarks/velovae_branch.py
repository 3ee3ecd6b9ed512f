"""Experiment: VeloVAE's full model with a per-gene branch time, on the pancreas.

Not part of explorer (nothing imports this file): a measurement of what the full
model's class leaves out (README, VeloVAE, "velocity direction" and "pancreas order").
In the full model a cell transcribes gene ``g`` at ``rho_g(c) alpha_g`` from the gene's
onset on, so a gene that peaks in Pre-endocrine and is lower in Beta can only be a lower
``rho`` in Beta at about the same time, never a fall after a branch. Here each gene
gets a branch time ``t_b`` (onset <= ``t_b`` <= switch-off): before it every cell
transcribes at a shared ``rho0_g alpha_g``, after it at its own ``rho_g(c) alpha_g``.
From ``(0, 0)`` the ODE is linear, so the prediction is ``rho0 A(t) + rho(c) B(t)``
with ``A`` the gene's curve at rate ``alpha`` on ``[t_on, t_b)`` and ``B`` on
``[t_b, t_off)`` (:func:`explorer.kinetics.trajectory` twice); ``t_b = t_on`` is the
full model itself.

Starting from a default fit (:class:`explorer.models.vae.VeloVAE`, seed 0), each arm
runs ``--rounds`` rounds of: (search) each gene's ``t_b`` among the onset and
``_N_CANDIDATES`` times spanning the cells' times, with ``rho0`` in closed form (least
squares, clipped to [0, 1]) on the training cells; (train) ``--steps`` full-batch Adam
steps on the decoder's network, ``rho0`` and the rates, each cell's time and state
fixed, ``t_b`` fixed; (re-read) each cell's time as the mean of its grid posterior
under the new curves (the fit's own temperature and grid, with room after the last
cell). The arms:

- ``control``: no branch (``t_b = t_on``): the same extra training and re-reading;
- ``search``: the search from the first round;
- ``forced``: in the first round every gene branches at one time, the
  ``--forced-quantile`` of the cells' times (0.81: just after Pre-endocrine's median,
  chosen by looking at the cluster medians, so the labels enter here), then the search;
- ``opened`` (not in the default ``--arms``): the first round as ``forced``, then no branch
  (``t_b = t_on``): does the full model keep a time that was opened once?

Each round is scored by explorer's own functions, the same for every arm:
held-out MSE (:func:`explorer.models.metrics.reconstruction_error`, the fit's 30%), the
cluster medians of the time, how many endocrine types come after Pre-endocrine, and
CBDir per transition (:func:`explorer.models.metrics.model_metrics`, all fitted genes; the
transitions of ``bench_dynamical.TRANSITIONS``; the committed JSON predates ``Ductal>Ngn3 low EP``).

Usage::

    python benchmarks/velovae_branch.py [--rounds 4] [--steps 200]
        [--arms control search forced opened] [--forced-quantile 0.81] [--out FILE]

It prints a table and writes ``benchmarks/results/velovae_branch.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
from bench_dynamical import TRANSITIONS

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("EXPLORER_SHARED", ROOT.parent / "shared"))
RESULTS = ROOT / "benchmarks" / "results"

#: branch times tried per gene in the search (besides the onset: no branch)
_N_CANDIDATES = 48
#: the re-read's grid: the fit's span of times, 10% before and 50% after it
_GRID = (0.1, 0.5, 300)
ENDOCRINE = ["Alpha", "Beta", "Delta", "Epsilon"]
GENES = ["Chgb", "Chga", "Pyy", "Cpe", "Pcsk2", "Gcg", "Ghrl", "Ins2", "Sst"]


class BranchRefit:
    """One arm: a copy of the fitted module, its per-gene ``t_b`` and ``rho0``, the cells' times."""

    def __init__(self, model, adata, cols: np.ndarray, train: np.ndarray) -> None:
        import torch

        from explorer.models.vae import _dense32

        self.torch = torch
        self.module = copy.deepcopy(model.module_).eval()
        post = model.posterior_state_[0]
        self.c, self.t = post["c_mean"], post["t_mean"].clone()
        self.temperature = float(model.time_temperature_["temperature"])
        self.u = torch.from_numpy(_dense32(adata.layers["Mu"][:, cols]))
        self.s = torch.from_numpy(_dense32(adata.layers["Ms"][:, cols]))
        self.train = train
        self.tr = torch.from_numpy(np.flatnonzero(train))
        self.wu, self.ws = self.module.sigma_u**-2, self.module.sigma_s**-2
        self.t_b = self.module.t_on.detach().clone()
        with torch.no_grad():
            rho = self.rho(self.c)
        self.rho0 = rho.median(0).values.clamp(1e-3, 1 - 1e-3)
        lo, hi = float(self.t.min()), float(self.t.max())
        self.grid = torch.linspace(lo - _GRID[0] * (hi - lo), hi + _GRID[1] * (hi - lo), _GRID[2])

    def rho(self, c):
        """``(n, G)`` each cell's ``rho`` from its state (the decoder's)."""
        return self.module.rho(c, c.shape[0])

    def curves(self, t, t_b):
        """``(A, B)``: each ``(u, s)`` at unit ``rho`` on ``[t_on, t_b)`` and ``[t_b, t_off)``.

        ``u`` in count units (times the scaling).
        """
        from explorer import kinetics

        torch, m = self.torch, self.module
        alpha, beta, gamma, scaling = m.rates()
        never = torch.maximum(t.detach().max(), m.t_on.detach().max()) + 1
        t_off = torch.where(m.switches, m.t_off, never)
        t_b = torch.minimum(torch.maximum(t_b, m.t_on), t_off)
        parts = []
        for start, stop in ((m.t_on, t_b), (t_b, t_off)):
            u, s = kinetics.trajectory(t, stop, alpha, beta, gamma, t_on=start, xp=torch)
            parts.append((u.clamp(min=0) * scaling, s.clamp(min=0)))
        return parts

    def predict(self, t, rho, rho0):
        """``(u, s, velocity)`` at times ``t`` ``(n, 1)`` and rates ``rho`` ``(n, G)``."""
        (au, as_), (bu, bs) = self.curves(t, self.t_b)
        u, s = rho0 * au + rho * bu, rho0 * as_ + rho * bs
        _, beta, gamma, scaling = self.module.rates()
        return u, s, beta * u / scaling - gamma * s

    def search(self) -> None:
        """Each gene's ``t_b`` (its onset: no branch, or a candidate) and ``rho0``: least training SSE."""
        torch, m = self.torch, self.module
        t = self.t[self.tr]
        with torch.no_grad():
            rho = self.rho(self.c[self.tr])
            u, s = self.u[self.tr], self.s[self.tr]
            best = torch.full_like(self.rho0, float("inf"))
            t_on = m.t_on.detach()
            times = torch.linspace(float(t.min()), float(t.max()), _N_CANDIDATES)
            candidates = [t_on, *(torch.full_like(t_on, float(x)) for x in times)]
            for t_b in candidates:
                t_b = torch.maximum(t_b, t_on)
                (au, as_), (bu, bs) = self.curves(t, t_b)
                ru, rs = u - rho * bu, s - rho * bs
                num = self.wu * (au * ru).sum(0) + self.ws * (as_ * rs).sum(0)
                den = self.wu * (au * au).sum(0) + self.ws * (as_ * as_).sum(0)
                rho0 = (num / den.clamp(min=1e-12)).clamp(1e-3, 1 - 1e-3)
                sse = self.wu * ((ru - rho0 * au) ** 2).sum(0) + self.ws * ((rs - rho0 * as_) ** 2).sum(0)
                better = sse < best
                best = torch.where(better, sse, best)
                self.t_b = torch.where(better, t_b, self.t_b)
                self.rho0 = torch.where(better, rho0, self.rho0)

    def train_steps(self, steps: int) -> float:
        """Full-batch Adam on the decoder's network, ``rho0`` and the rates; time, state and ``t_b`` fixed."""
        torch, m = self.torch, self.module
        net = [*m.decoder.parameters(), *m.rho_head.parameters()]
        rates = m.rate_parameters()
        logit = torch.logit(self.rho0).clone().requires_grad_(True)
        for p in net + rates:
            p.requires_grad_(True)
        groups = [{"params": net, "lr": 1e-3}, {"params": rates, "lr": 2e-3}, {"params": [logit], "lr": 2e-2}]
        opt = torch.optim.Adam(groups)
        t, c, u, s = self.t[self.tr], self.c[self.tr], self.u[self.tr], self.s[self.tr]
        for _ in range(steps):
            opt.zero_grad()
            pu, ps, _ = self.predict(t, self.rho(c), torch.sigmoid(logit))
            loss = 0.5 * (((u - pu) ** 2 * self.wu).sum(1) + ((s - ps) ** 2 * self.ws).sum(1)).mean()
            loss.backward()
            opt.step()
        for p in net + rates:
            p.requires_grad_(False)
        self.rho0 = torch.sigmoid(logit).detach()
        return loss.item()

    def reread(self) -> None:
        """Each cell's time: the mean of its tempered grid posterior under the current curves (flat prior)."""
        torch = self.torch
        grid = self.grid
        with torch.no_grad():
            (au, as_), (bu, bs) = self.curves(grid[:, None], self.t_b)
            rho_all, r0 = self.rho(self.c).double(), self.rho0.double()
            rows = []
            for start in range(0, rho_all.shape[0], 512):
                sl = slice(start, start + 512)
                rho, total = rho_all[sl], 0.0
                for x, a, b, w in ((self.u[sl], au, bu, self.wu), (self.s[sl], as_, bs, self.ws)):
                    x, a, b, w = x.double(), a.double(), b.double(), w.double()
                    # sum_g w (x - r0 a - rho b)^2, expanded into products over the grid
                    total = total + (x * x * w).sum(1, keepdim=True)
                    total = total - 2 * (x * w * r0) @ a.T - 2 * (x * w * rho) @ b.T
                    total = total + ((r0 * r0 * w) * a * a).sum(1)[None, :] + 2 * (rho * w * r0) @ (a * b).T
                    total = total + (rho * rho * w) @ (b * b).T
                rows.append(torch.softmax(-0.5 * total / self.temperature, 1) @ grid.double())
            self.t = torch.cat(rows).float()[:, None]

    def score(self, adata, cols: np.ndarray) -> dict:
        """Held-out MSE, cluster medians of the time, endocrine types after Pre-endocrine, CBDir."""
        from explorer.models.metrics import model_metrics, reconstruction_error

        torch = self.torch
        with torch.no_grad():
            u, s, v = self.predict(self.t, self.rho(self.c), self.rho0)
        err = reconstruction_error(self.u.numpy(), self.s.numpy(), u.numpy(), s.numpy(), train=self.train)
        scored = adata.copy()
        velocity = np.full(adata.shape, np.nan, dtype=np.float32)
        velocity[:, cols] = v.numpy()
        scored.layers["velocity"] = velocity
        metrics = model_metrics(scored, transitions=TRANSITIONS)
        labels = adata.obs["clusters"].astype(str).to_numpy()
        medians = pd.Series(self.t[:, 0].numpy(), index=labels).groupby(level=0).median()
        return {
            "mse_test": round(float(err.summary["mse_test"]), 3),
            "after_pre_endocrine": [c for c in ENDOCRINE if medians[c] > medians["Pre-endocrine"]],
            "medians": {k: round(float(x), 2) for k, x in medians.sort_values().items()},
            "cbdir": {
                f"{a}>{b}": round(float(metrics.summary[f"cbdir[{a}>{b}]"]), 3) for a, b in TRANSITIONS
            },
            "branching_genes": int((self.t_b > self.module.t_on.detach() + 1e-6).sum()),
        }

    def genes(self, names: pd.Index, adata) -> dict:
        labels = adata.obs["clusters"].astype(str).to_numpy()
        with self.torch.no_grad():
            rho = self.rho(self.c).numpy()
        out = {}
        for g in GENES:
            if g in names:
                j = names.get_loc(g)
                by = pd.Series(rho[:, j], index=labels).groupby(level=0).median()
                out[g] = {
                    "t_on": round(float(self.module.t_on.detach()[j]), 2),
                    "t_b": round(float(self.t_b[j]), 2),
                    "rho0": round(float(self.rho0[j]), 2),
                    "rho": {k: round(float(by[k]), 2) for k in ["Pre-endocrine", *ENDOCRINE]},
                }
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=200)
    arms = ["control", "search", "forced"]
    parser.add_argument("--arms", nargs="+", default=arms, choices=[*arms, "opened"])
    parser.add_argument("--forced-quantile", type=float, default=0.81)
    parser.add_argument("--out", default=str(RESULTS / "velovae_branch.json"))
    args = parser.parse_args()

    from explorer._process import set_up_process

    set_up_process()
    import anndata as ad
    import torch

    from explorer.keys import Key
    from explorer.models.vae import VeloVAE
    from explorer.pipeline import prepare

    adata = ad.read_h5ad(SHARED / "data" / "pancreas_endocrinogenesis_3696.h5ad")
    prepare(adata, seed=0)
    clock = time.perf_counter()
    model = VeloVAE()
    result = model.fit(adata)
    fit_s = time.perf_counter() - clock
    cols = np.flatnonzero(model._select_genes(adata))
    train = result.obs[Key.obs.FIT_TRAIN].to_numpy(dtype=bool)
    names = adata.var_names[cols]
    payload = {"fit_seconds": round(fit_s, 1), "rounds": args.rounds, "steps": args.steps, "arms": {}}
    for arm in args.arms:
        torch.manual_seed(0)
        refit = BranchRefit(model, adata, cols, train)
        rows = [{"round": "fit", **refit.score(adata, cols)}]
        print(f"{arm:8} fit      {rows[0]}", flush=True)
        for r in range(args.rounds):
            clock = time.perf_counter()
            if arm in ("forced", "opened") and r == 0:
                at = float(torch.quantile(refit.t, args.forced_quantile))
                refit.t_b = torch.maximum(torch.full_like(refit.t_b, at), refit.module.t_on.detach())
            elif arm == "opened":
                refit.t_b = refit.module.t_on.detach().clone()  # the time opened: no branch from here on
            elif arm != "control":
                refit.search()
            loss = refit.train_steps(args.steps)
            refit.reread()
            seconds = round(time.perf_counter() - clock, 1)
            row = {"round": r + 1, "loss": round(loss, 1), "seconds": seconds, **refit.score(adata, cols)}
            rows.append(row)
            print(f"{arm:8} round {r + 1}  {row}", flush=True)
        payload["arms"][arm] = {"rounds": rows, "genes": refit.genes(names, adata)}
        print(f"{arm:8} genes    {payload['arms'][arm]['genes']}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
