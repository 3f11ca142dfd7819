"""Evaluation plots: ROC, calibration, decision curve, risk distribution (PNG files).

Only aggregates are drawn (curves, binned rates, histograms): no patient row can be
read back from a plot.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from training import metrics as M
from training.censoring import CensoringSurvival, ipcw_weights
from training.evaluate import EvalFrame


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def evaluation_plots(risks: np.ndarray, data: EvalFrame, horizons: list[int], out_dir: Path,
                     title: str) -> list[Path]:
    """Four PNGs, each with one line per horizon."""
    out_dir.mkdir(parents=True, exist_ok=True)
    g = CensoringSurvival.fit(data.time_days, data.event_type)
    figs = {name: plt.subplots(figsize=(5, 4)) for name in
            ("roc", "calibration", "decision_curve", "risk_distribution")}
    thresholds = np.linspace(0.01, 0.5, 50)
    for i, h in enumerate(horizons):
        r, y = risks[:, i], data.labels[h]
        w = ipcw_weights(data.time_days, y, h, g)
        fpr, tpr = M.roc_curve(r, y, w)
        auc = M.auroc(r, y, w)[0]
        figs["roc"][1].plot(fpr, tpr, label=f"{h} days (AUROC {auc:.3f})")
        _, pred, obs = M.calibration_bins(r, y, w, M.bin_edges(r))
        figs["calibration"][1].plot(pred[:, 0], obs[:, 0], "o-", label=f"{h} days")
        nb = [M.net_benefit(r, y, w, t)[0] for t in thresholds]
        nb_all = [M.net_benefit_treat_all(y, w, t)[0] for t in thresholds]
        ax = figs["decision_curve"][1]
        ax.plot(thresholds, nb, label=f"model, {h} days")
        ax.plot(thresholds, nb_all, "--", label=f"treat all, {h} days")
        obs_rows = w > 0
        ax = figs["risk_distribution"][1]
        for label, name in ((1, "outcome"), (0, "no outcome")):
            sel = obs_rows & (y == label)
            if sel.any():
                ax.hist(r[sel], bins=30, alpha=0.5, density=True, label=f"{name}, {h} days")
    ax = figs["roc"][1]
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="false positive rate (IPCW)", ylabel="true positive rate (IPCW)")
    ax = figs["calibration"][1]
    top = max(float(np.nanmax(risks)), 0.05)
    ax.plot([0, top], [0, top], ":", color="grey")
    ax.set(xlabel="predicted risk (bin mean)", ylabel="observed risk (IPCW)")
    ax = figs["decision_curve"][1]
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(xlabel="threshold probability", ylabel="net benefit", ylim=(-0.05, None))
    figs["risk_distribution"][1].set(xlabel="predicted risk", ylabel="density")
    paths = []
    for name, (fig, ax) in figs.items():
        ax.set_title(f"{title}: {name.replace('_', ' ')}", fontsize=9)
        ax.legend(fontsize=7)
        paths.append(_save(fig, out_dir / f"{name}.png"))
    return paths
