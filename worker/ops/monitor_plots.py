"""`cxr monitor --plot DIR`: the report as PNGs (matplotlib Agg, no display needed).

One picture per stage-1 version (sensitivity and specificity per week with their 95 %
intervals) and one of each version's probability PSI per day against the alarm threshold.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def write_plots(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """The PNGs of ``report`` in ``out_dir``; the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [_version_plot(v, out_dir) for v in report["versions"]
               if v["stage"] == "pneumonia" and v["weeks"]]
    if report["drift"]["days"]:
        written.append(_psi_plot(report["drift"], out_dir))
    return written


def _version_plot(version: dict[str, Any], out_dir: Path) -> Path:
    weeks = version["weeks"]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=80)
    x = list(range(len(weeks)))
    for offset, (name, colour) in enumerate((("sensitivity", "tab:red"),
                                             ("specificity", "tab:blue"))):
        points = [(i + (offset - 0.5) * 0.1, w[name], w[f"{name}_ci"]) for i, w in zip(x, weeks,
                                                                              strict=True)
                  if w[name] is not None]
        if not points:
            continue
        xs, ys, cis = zip(*points, strict=True)
        errors = [[y - ci[0] for y, ci in zip(ys, cis, strict=True)],
                  [ci[1] - y for y, ci in zip(ys, cis, strict=True)]]
        ax.errorbar(xs, ys, yerr=errors, fmt="o-", capsize=4, color=colour, label=name)
    ax.set_xticks(x, [f"{w['week']}\nn={w['n_labelled']}" for w in weeks])
    ax.set_xlim(-0.5, len(weeks) - 0.5)
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{version['model']} on labelled images (95 % intervals)")
    ax.legend(loc="lower left")
    fig.tight_layout()
    path = out_dir / f"{version['model'].replace('/', '-')}-weekly.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def _psi_plot(drift: dict[str, Any], out_dir: Path) -> Path:
    series: dict[str, list[tuple[str, float]]] = {}
    for day in drift["days"]:
        for stage in day["stages"]:
            if stage["psi"] is not None:
                series.setdefault(stage["model"], []).append((day["day"], stage["psi"]))
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=80)
    days = [d["day"] for d in drift["days"]]
    for model, points in sorted(series.items()):
        ax.plot([days.index(d) for d, _ in points], [p for _, p in points], "o-", label=model)
    ax.axhline(drift["psi_threshold"], color="grey", linestyle="--", label="alarm")
    ax.set_xticks(range(len(days)), days, rotation=30, ha="right")
    ax.set_xlim(-0.5, len(days) - 0.5)
    ax.set_ylabel("PSI against reference")
    ax.set_title("Served probabilities: drift per day")
    ax.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    path = out_dir / "psi-per-day.png"
    fig.savefig(path)
    plt.close(fig)
    return path
