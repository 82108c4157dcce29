"""The short human report (``report.md``) that goes into each bundle."""

from __future__ import annotations

from typing import Any

from db.vocabulary import DISCLAIMER

VALIDITY_NOTE = (
    f"**{DISCLAIMER}** These figures describe a model on one data set; they are not a clinical "
    "validation."
)
SYNTHETIC_NOTE = (
    "**Synthetic data.** This model was trained and tested on generated images; its figures "
    "say nothing about real chest X-rays."
)
# Kermany et al., Cell 2018, on the Kaggle test split (see DESIGN.md).
KERMANY_2018: dict[str, dict[str, float]] = {
    "pneumonia": {"accuracy": 0.928, "sensitivity": 0.932, "specificity": 0.901, "auc": 0.968},
    "infection": {"accuracy": 0.907, "auc": 0.940},
}
ROWS = ("accuracy", "sensitivity", "specificity", "precision", "f1", "auc")


def _fmt(value: Any) -> str:
    return "n/a" if value is None or value != value else f"{value:.3f}"


def render_report(metrics: dict[str, Any], params: dict[str, Any], *, synthetic: bool) -> str:
    """Markdown: metrics with 95% CIs, threshold, data counts, timing, published comparison."""
    stage = metrics["stage"]
    test, ci = metrics["test"], metrics["test"].get("ci95", {})
    names = metrics.get("class_names", ["0", "1"])
    published = {} if synthetic else KERMANY_2018.get(stage, {})
    lines = [f"# {stage} model: {params.get('backbone')} at {params.get('img_size')} px", ""]
    lines += [SYNTHETIC_NOTE, ""] if synthetic else []
    lines += [
        f"Positive class: {names[1]}. Threshold {metrics['threshold']:.4f}, tuned on validation "
        f"for sensitivity >= {metrics['target_sensitivity']:.2f} (validation sensitivity "
        f"{_fmt(metrics['val'].get('sensitivity'))}, AUC {_fmt(metrics['val'].get('auc'))}).",
        "",
        f"## Test split ({test['n']} images, {test['n_positive']} {names[1]})",
        "",
        "| metric | value | 95% CI |" + (" Kermany 2018 |" if published else ""),
        "|---|---|---|" + ("---|" if published else ""),
    ]
    for key in ROWS:
        lo, hi = (ci.get(key) or [None, None])[:2]
        row = f"| {key} | {_fmt(test.get(key))} | {_fmt(lo)} - {_fmt(hi)} |"
        if published:
            row += f" {_fmt(published.get(key))} |"
        lines.append(row)
    (tn, fp), (fn, tp) = test["confusion"]
    lines += [
        "",
        f"Confusion (rows true, columns predicted; {names[0]}, {names[1]}): "
        f"[[{tn}, {fp}], [{fn}, {tp}]].",
    ]
    cascade = metrics.get("cascade")
    if cascade:
        lines += [
            "",
            "## Three-class cascade on the test split",
            "",
            f"Accuracy {_fmt(cascade['accuracy'])} over {cascade['n']} images; recall "
            + ", ".join(f"{k} {_fmt(v)}" for k, v in cascade["recall"].items())
            + f". Confusion (rows true {', '.join(cascade['classes'])}): {cascade['confusion']}.",
        ]
    counts = metrics.get("counts", {})
    lines += ["", "## Data and training", ""]
    for split in ("train", "val", "test"):
        c = counts.get(split, {})
        lines.append(f"- {split}: {c.get('0', 0)} {names[0]}, {c.get('1', 0)} {names[1]}")
    timing = metrics.get("timing", {})
    if "epoch_time_ratio" in timing:
        lines.append(
            f"- phase-1 epoch on cached features {timing['cached_epoch_s']:.2f} s versus "
            f"{timing['uncached_epoch_s']:.2f} s through the frozen base "
            f"(ratio {timing['epoch_time_ratio']:.1f}x; features computed once in "
            f"{timing['feature_extraction_s']:.1f} s)"
        )
    lines.append(
        f"- epochs run: {metrics.get('epochs_run')}, seed {params.get('seed')}, "
        f"weights {params.get('weights')}, best validation AUC {_fmt(metrics.get('best_val_auc'))}"
    )
    lines += ["", VALIDITY_NOTE, ""]
    return "\n".join(lines)
