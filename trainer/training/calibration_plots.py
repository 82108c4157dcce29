"""Reliability diagram PNG for the model card (matplotlib Agg, house style of ``plots``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from trainer.training.plots import _finish, plt


def plot_reliability(reliability: dict[str, dict], path: Path, *, title: str = "calibration",
                     band: list[float] | None = None, synthetic: bool = False) -> Path:
    """Observed positive rate against mean predicted probability per bin, before and after
    calibration (``Calibration.reliability``), the diagonal, and the uncertain band shaded."""
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfect")
    for name, style in (("before", "o--"), ("after", "s-")):
        r = reliability.get(name)
        if not r:
            continue
        count = np.asarray(r["count"])
        used = count > 0
        ax.plot(np.asarray(r["predicted"])[used], np.asarray(r["observed"])[used], style,
                label=f"{name} (n={int(count.sum())})")
    if band:
        ax.axvspan(band[0], band[1], color="orange", alpha=0.2, label="uncertain band")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("predicted probability")
    ax.set_ylabel("observed frequency")
    ax.legend(loc="upper left")
    return _finish(fig, ax, path, f"{title}: reliability", synthetic)
