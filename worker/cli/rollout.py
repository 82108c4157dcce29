"""`cxr models shadow|compare|history`, the promotion guard's output, and `cxr results
--history`: parsing and printing only (the decisions are in ``worker.ops.rollout``)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from db.vocabulary import DISCLAIMER, Label, Stage
from worker.cli.format import format_table


def add_who(parser: argparse.ArgumentParser) -> None:
    """``--by`` and ``--reason``: what the audit trail records about a change."""
    parser.add_argument("--by", help="who makes this change (default: the OS user)")
    parser.add_argument("--reason", help="why, for the audit trail")


def register_models(models_sub, stages: list[str], parse_version, parse_date) -> None:
    """Add shadow, compare and history to `cxr models`."""
    shadow = models_sub.add_parser(
        "shadow", help="run a candidate beside production on live images (never shown)",
        description="Workers also run STAGE VERSION on every image they classify, on the same "
        "pixels, and store its answers for `cxr models compare`; rows show production only.")
    shadow.add_argument("stage", choices=stages)
    shadow.add_argument("version", type=parse_version, nargs="?")
    shadow.add_argument("--off", action="store_true", help="stop shadowing in this stage")
    add_who(shadow)
    shadow.set_defaults(func=cmd_shadow)
    comp = models_sub.add_parser(
        "compare", help="production against a candidate on the same images",
        description="Agreement, the 2x2 table, the images whose label would flip, and with "
        "ground-truth labels sensitivity, specificity and AUC (95 %% intervals) and McNemar's "
        "test. " + DISCLAIMER)
    comp.add_argument("stage", choices=stages)
    comp.add_argument("version", type=parse_version)
    comp.add_argument("--since", type=parse_date, help="images received since (ISO date/time)")
    comp.add_argument("--format", choices=["text", "json"], default="text")
    comp.add_argument("--png", type=Path, help="also draw the comparison into this PNG")
    comp.set_defaults(func=cmd_compare)
    hist = models_sub.add_parser("history", help="the audit trail: who changed what, when, why")
    hist.add_argument("--stage", choices=stages)
    hist.add_argument("--limit", type=int, default=50)
    hist.set_defaults(func=cmd_history)


def cmd_shadow(args: argparse.Namespace, settings: Any) -> int:
    from db.exceptions import CxrError
    from db.migrate import check_schema
    from worker.ops.rollout import set_shadow

    check_schema(settings.db_url)
    if args.off == (args.version is not None):
        raise CxrError("give a VERSION to shadow, or --off to stop")
    print(set_shadow(settings.db_url, args.stage, args.version, args.by, args.reason))
    return 0


def cmd_compare(args: argparse.Namespace, settings: Any) -> int:
    from db.migrate import check_schema
    from db.session import session_scope
    from worker.ops.rollout import comparison

    check_schema(settings.db_url)
    with session_scope(settings.db_url) as session:
        seen = comparison(session, args.stage, args.version, args.since)
    if args.png:
        from trainer.training.rollout_plot import plot_comparison

        plot_comparison(seen.report, seen.pairs, args.png)
    if args.format == "json":
        print(json.dumps(_json_safe(seen.report), indent=2))
    else:
        print(format_report(seen.report))
        if args.png:
            print(f"picture: {args.png}")
    return 0


def format_report(report: dict[str, Any]) -> str:
    """The comparison as text: the table, flips, and the labelled figures when there are some."""
    stage, n = report["stage"], report["n"]
    head = (f"{stage}: production (v{','.join(map(str, report['production_versions'])) or '-'}"
            f") against candidate v{report['candidate_version']} on {n} image(s)")
    if n == 0:
        return (f"{head}\nno image has both answers yet: shadow it (`cxr models shadow {stage} "
                f"{report['candidate_version']}`) or re-score past images")
    neg, pos = report["classes"]
    lo, hi = report["agreement_ci95"]
    lines = [head, f"agreement {report['agreement']:.1%} (95 % CI {lo:.1%}-{hi:.1%})", "",
             format_table(["production \\ candidate", neg, pos],
                          [[neg, *map(str, report["table"][0])],
                           [pos, *map(str, report["table"][1])]]), ""]
    lines.append(f"{report['flips']} image(s) would change label"
                 + (":" if report["flips"] else ""))
    if report["flipped"]:
        lines.append(format_table(
            ["image", "production", "p", "candidate", "p"],
            [[str(f["image_id"]), f["production"], f"{f['production_p']:.3f}", f["candidate"],
              f"{f['candidate_p']:.3f}"] for f in report["flipped"]]))
    lines += ["", _labelled_lines(report.get("labelled")), DISCLAIMER]
    return "\n".join(lines)


def _labelled_lines(labelled: dict[str, Any] | None) -> str:
    if not labelled:
        return "no ground-truth labels for these images: sensitivity and AUC not computed"
    rows = []
    for who in ("production", "candidate"):
        m = labelled[who]
        rows.append([who, *(_ci(m[k]) for k in ("sensitivity", "specificity", "auc"))])
    mc = labelled["mcnemar"]
    return "\n".join([
        f"on {labelled['n']} labelled image(s) ({labelled['n_positive']} positive):",
        format_table(["", "sensitivity", "specificity", "AUC"], rows),
        f"McNemar (exact): {mc['production_only_right']} right by production only, "
        f"{mc['candidate_only_right']} by the candidate only, p = {mc['p_value']:.3g}"])


def _ci(metric: dict[str, Any]) -> str:
    value, (lo, hi) = metric["value"], metric["ci95"]
    if math.isnan(value):
        return "n/a"
    return f"{value:.3f} ({lo:.3f}-{hi:.3f})"


def _json_safe(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def cmd_history(args: argparse.Namespace, settings: Any) -> int:
    from db import audit
    from db.migrate import check_schema
    from db.session import session_scope

    check_schema(settings.db_url)
    with session_scope(settings.db_url) as session:
        rows = audit.history(session, args.stage, args.limit or None)
    table = [[r.created_at.strftime("%Y-%m-%d %H:%M:%S"), r.action, r.stage or "",
              f"v{r.version}" if r.version else "", _detail(r.detail), r.actor, r.reason or ""]
             for r in rows]
    print(format_table(["when (UTC)", "action", "stage", "version", "detail", "by", "reason"],
                       table) if table else "no change recorded yet")
    return 0


def _detail(detail: dict[str, Any]) -> str:
    parts = []
    before, after = detail.get("from"), detail.get("to")
    if before is not None or after is not None:
        parts.append(" -> ".join(f"v{v}" if v else "(none)" for v in (before, after)))
    parts += [f"{k}={v}" for k, v in detail.items()
              if k not in ("from", "to", "guard") and v not in (None, False, {}, [])]
    return " ".join(parts)


def print_history(session, image_id: int) -> int:
    """`cxr results --history ID`: every prediction the image has had."""
    from db.prediction_roles import image_history

    rows = image_history(session, image_id)
    if not rows:
        print(f"image {image_id} has no prediction yet")
        return 0
    print(format_table(
        ["when (UTC)", "role", "label", "p_pneumonia", "p_virus", "pneumonia", "infection",
         "shown"],
        [[r.at.strftime("%Y-%m-%d %H:%M:%S"), r.role, r.label, f"{r.p_pneumonia:.3f}",
          "" if r.p_virus is None else f"{r.p_virus:.3f}", f"v{r.pneumonia_model}",
          f"v{r.infection_model}" if r.infection_model else "", "*" if r.shown else ""]
         for r in rows]))
    print(f"\n{DISCLAIMER}")
    return 0


STAGES = [s.value for s in Stage]


def register(sub: argparse._SubParsersAction) -> None:
    """`cxr rescore`."""
    from worker.cli.db import _parse_iso

    res = sub.add_parser(
        "rescore", help="classify past images again with today's production models",
        description="Re-classify finished images with the current production versions, "
        "through the workers' lower-priority queue (live images go first). Idempotent and "
        "resumable: run it again after a crash and it goes on. Each row then shows the newest "
        "prediction; `cxr results --history ID` lists every one.")
    res.add_argument("--since", type=_parse_iso, help="received since (ISO date/time)")
    res.add_argument("--until", type=_parse_iso, help="received before (ISO date/time)")
    res.add_argument("--label", type=str.upper, choices=[label.value for label in Label],
                     help="only images showing this label now")
    res.add_argument("--status", choices=["done"], default=None,
                     help="which images (default: every finished one, i.e. done)")
    res.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_who(res)
    res.set_defaults(func=cmd_rescore)


def cmd_rescore(args: argparse.Namespace, settings: Any) -> int:
    from db.migrate import check_schema
    from worker.ops import rescore

    check_schema(settings.db_url)
    wanted = rescore.filters(args.since, args.until, args.label, args.status)
    outcome = rescore.run(settings, wanted, actor=args.by, reason=args.reason,
                          progress=not args.no_progress)
    how = "resumed and finished" if outcome.resumed else "finished"
    print(f"re-score job {outcome.job_id} {how}: {outcome.total} image(s)")
    for image_id, reason in sorted(outcome.skipped.items(), key=lambda kv: int(kv[0])):
        print(f"  image {image_id} kept its answer: {reason}")
    return 0
