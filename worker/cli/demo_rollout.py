"""The demo's second act: a new version goes out safely. Train a second stage-1 version,
shadow it on fresh images, compare it with production against the synthetic ground truth,
promote it past the guard, re-score the earlier images and show the audit trail."""

from __future__ import annotations

import argparse
from pathlib import Path

from worker.settings import Settings

ACTOR = "cxr demo"


def rollout_act(settings: Settings, data: Path, args: argparse.Namespace, drop, wait,
                stack, first: dict[str, str]) -> None:
    """``drop(settings, n)`` and ``wait(settings, names, stack, timeout)`` are the demo's own
    steps; ``first`` is the first act's file name -> true label."""
    from db import registry
    from db.session import session_scope
    from worker.ops.rollout import set_shadow

    version = _train_candidate(settings, data, args)
    print("\n$ cxr models shadow pneumonia", version, flush=True)
    print(set_shadow(settings.db_url, "pneumonia", version, ACTOR, "demo: try the new version"))
    names = drop(settings, args.images)
    print(f"copied {len(names)} more held-out images into {settings.inbox_dir}", flush=True)
    rows = wait(settings, names, stack, args.timeout)
    truth_by_name = {**first, **names}
    with session_scope(settings.db_url) as session:
        production = registry.get_production(session, "pneumonia")
    truth = {r["id"]: truth_by_name[r["file_name"]] for r in rows  # films, not the hand
             if truth_by_name[r["file_name"]] in ("NORMAL", "BACTERIA", "VIRUS")}
    _compare_and_promote(settings, version, production.version, truth)
    _rescore(settings)


def _train_candidate(settings: Settings, data: Path, args: argparse.Namespace) -> int:
    """A second pneumonia version (more epochs, not promoted); its version number."""
    from db import registry
    from db.session import session_scope
    from worker.cli import build_parser

    argv = ["train", "--data", str(data), "--stage", "pneumonia", "--backbone", "smallcnn",
            "--weights", "none", "--img-size", str(args.img_size), "--epochs",
            str(args.epochs + 4), "--fine-tune-epochs", "0"]
    print("\n$ cxr " + " ".join(argv), flush=True)
    train_args = build_parser().parse_args(argv)
    train_args.func(train_args, settings)
    with session_scope(settings.db_url) as session:
        return max(m.version for m in registry.list_versions(session, "pneumonia"))


def _compare_and_promote(settings: Settings, version: int, before: int,
                         truth: dict[int, str]) -> None:
    from db.session import session_scope
    from trainer.training.rollout_plot import plot_comparison
    from worker.cli.rollout import format_report
    from worker.ops.rollout import PromotionRefused, comparison, promote_guarded

    print(f"\n$ cxr models compare pneumonia {version}   (the demo knows the synthetic truth)")
    with session_scope(settings.db_url) as session:
        seen = comparison(session, "pneumonia", version, truth=truth)
    print(format_report(seen.report))
    picture = settings.data_dir.absolute() / "demo" / "compare.png"
    picture.parent.mkdir(parents=True, exist_ok=True)
    plot_comparison(seen.report, seen.pairs, picture)
    print(f"picture: {picture}")
    print(f"\n$ cxr models promote pneumonia {version}")
    try:
        name, _ = promote_guarded(settings.db_url, "pneumonia", version, actor=ACTOR,
                                  truth=truth)
    except PromotionRefused as refused:
        print(f"cxr: error: {refused}")
        print(f"\n$ cxr models promote pneumonia {version} --force --reason '...'")
        name, _ = promote_guarded(settings.db_url, "pneumonia", version, force=True,
                                  actor=ACTOR, truth=truth,
                                  reason="demo: synthetic data, promoted to show the rest")
    print(f"{name} is now in production (was v{before})")


def _rescore(settings: Settings) -> None:
    from worker.cli import build_parser

    for argv in (["rescore", "--by", ACTOR, "--reason", "demo: new production version"],
                 ["models", "history"]):
        print("\n$ cxr " + " ".join(argv), flush=True)
        parsed = build_parser().parse_args(argv)
        parsed.func(parsed, settings)
