"""The comparison picture (`cxr models compare --png`): each image's production probability
against the candidate's, the thresholds' quadrants, and the flips in colour."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_comparison(report: dict[str, Any], pairs: Sequence[Any], path: Path) -> Path:
    """A scatter of p(positive) production vs candidate, flips in red, and the 2x2 table."""
    fig, (ax, side) = plt.subplots(1, 2, figsize=(10, 4.6), width_ratios=[1.3, 1])
    agree = [p for p in pairs if p.production_label == p.candidate_label]
    flip = [p for p in pairs if p.production_label != p.candidate_label]
    for group, colour, name in ((agree, "tab:blue", "same label"), (flip, "tab:red", "flips")):
        ax.scatter([p.production_p for p in group], [p.candidate_p for p in group], s=14,
                   c=colour, alpha=0.7, label=f"{name} ({len(group)})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    positive = report["classes"][1]
    ax.set_xlabel(f"production p({positive})")
    ax.set_ylabel(f"candidate v{report.get('candidate_version')} p({positive})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left")
    ax.set_title(f"{report['stage']}: {report['n']} images, agreement "
                 f"{report['agreement']:.1%}")
    side.axis("off")
    neg, pos = report["classes"]
    cells = [[f"prod {neg}", *map(str, report["table"][0])],
             [f"prod {pos}", *map(str, report["table"][1])]]
    side.table(cellText=cells, colLabels=["", f"cand {neg}", f"cand {pos}"], loc="upper center")
    side.text(0.0, 0.35, _labelled_text(report.get("labelled")), va="top", family="monospace",
              fontsize=8)
    fig.text(0.99, 0.01, "decision support only", ha="right", va="bottom", fontsize=8,
             color="grey")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _labelled_text(labelled: dict[str, Any] | None) -> str:
    if not labelled:
        return "no ground-truth labels for these images"
    lines = [f"{labelled['n']} labelled images"]
    for who in ("production", "candidate"):
        m = labelled[who]
        lines.append(f"{who:10} sens {m['sensitivity']['value']:.3f} spec "
                     f"{m['specificity']['value']:.3f} AUC {m['auc']['value']:.3f}")
    lines.append(f"McNemar p = {labelled['mcnemar']['p_value']:.3g}")
    return "\n".join(lines)
