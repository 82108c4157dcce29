"""`cxr monitor`: each model version measured against the ground truth, and drift per day."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    mon = sub.add_parser(
        "monitor", help="each model version against the ground truth; drift per day",
        description="For every model version that served: sensitivity, specificity, "
                    "accuracy, AUC (stage 1), accuracy (stage 2, cascade) on its labelled "
                    "images (`cxr labels import`), overall and per week, with 95% intervals; "
                    "per day: label, status and input mix, and each version's probabilities "
                    "against its validation reference (PSI, KS).")
    mon.add_argument("--format", choices=["text", "json"], default="text")
    mon.add_argument("--days", type=int, default=14, help="days of drift to show (default 14)")
    mon.add_argument("--plot", type=Path, metavar="DIR", help="also write PNGs into DIR")
    mon.add_argument("--check", action="store_true",
                     help="exit 1 when a drift passes CXR_MONITOR_PSI (for cron or CI)")
    mon.set_defaults(func=cmd_monitor)


def cmd_monitor(args: argparse.Namespace, settings: Any) -> int:
    from db.migrate import check_schema
    from worker.ops.monitor import build_report

    check_schema(settings.db_url)
    report = build_report(settings.db_url, days=max(1, args.days),
                          psi_threshold=settings.monitor_psi)
    if args.format == "json":
        print(json.dumps(report, indent=2, default=str))
    else:
        print(format_report(report))
    if args.plot:
        from worker.ops.monitor_plots import write_plots

        for path in write_plots(report, args.plot):
            print(f"wrote {path}", file=sys.stderr)
    return 1 if args.check and report["drifted"] else 0


def _rate(value: float | None, ci: list[float] | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" + (f" [{ci[0]:.3f}-{ci[1]:.3f}]" if ci else "")


STAGE_ONE = ("sensitivity", "specificity", "accuracy", "auc", "cascade_accuracy")
STAGE_TWO = ("accuracy", "auc")


def _figures_line(figures: dict[str, Any], stage: str) -> str:
    names = STAGE_ONE if stage == "pneumonia" else STAGE_TWO
    parts = [f"n={figures['n_labelled']}"]
    parts += [f"{name.replace('_', ' ')} {_rate(figures[name], figures[f'{name}_ci'])}"
              for name in names]
    if figures.get("review_share") is not None:
        parts.append(f"review flags {_rate(figures['review_share'], None)}, wrong when "
                     f"flagged {_rate(figures['flagged_wrong'], None)}")
    return "  ".join(parts)


def format_report(report: dict[str, Any]) -> str:
    """The report as text: versions first, then drift per day, then the verdict."""
    lines = [f"cxr monitor, {report['generated_at']}. {report['disclaimer']}", "",
             "Per model version, on its labelled images (95% intervals):"]
    if not report["versions"]:
        lines.append("  no model version has served yet")
    for v in report["versions"]:
        lines.append(f"  {v['model']} ({v['status']}): {_figures_line(v, v['stage'])}")
        lines += [f"    week {w['week']}: {_figures_line(w, v['stage'])}" for w in v["weeks"]]
    drift = report["drift"]
    lines += ["", f"Drift per day (PSI > {drift['psi_threshold']:g} with n >= "
                  f"{drift['min_n']} flags):"]
    for day in drift["days"]:
        lines.append(f"  {day['day']}: {day['n_images']} image(s); labels "
                     f"{_shares(day['labels'])}; statuses {_shares(day['statuses'])}")
        lines.append("    input: " + "; ".join(f"{k} {_shares(v)}"
                                               for k, v in day["input"].items()))
        moved = {k: v for k, v in day["psi_vs_earlier"].items() if v is not None}
        if moved:
            lines.append("    PSI against the earlier days: "
                         + ", ".join(f"{k} {v:.3f}" for k, v in moved.items()))
        for s in day["stages"]:
            scores = (f"PSI {s['psi']:.3f} KS {s['ks']:.3f} against {s['reference']}"
                      if s["psi"] is not None else "no reference")
            lines.append(f"    {s['model']}: n={s['n']} {scores}"
                         + ("  DRIFT" if s["drifted"] else ""))
    lines.append(f"  not stored, so not measured: {', '.join(drift['not_measured'])}")
    lines.append("")
    lines += [f"DRIFT: {alarm}" for alarm in drift["alarms"]] or ["No drift past the threshold."]
    return "\n".join(lines)


def _shares(shares: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.0%}" for k, v in shares.items()) or "-"
