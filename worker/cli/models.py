"""`cxr models list|show|promote|rollback|import` (and, from ``worker.cli.rollout``,
`shadow|compare|history`): the model registry from the command line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from db.vocabulary import Stage
from worker.cli.db import _parse_iso
from worker.cli.format import format_table
from worker.cli.rollout import add_who, register_models


def register(sub: argparse._SubParsersAction) -> None:
    models = sub.add_parser(
        "models",
        help="model registry: list, show, promote, rollback, import, shadow, compare, history",
        description="Versioned model bundles per stage (pneumonia, infection).",
    )
    models_sub = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    stages = [s.value for s in Stage]
    ls = models_sub.add_parser("list", help="list registered model versions")
    ls.add_argument("--stage", choices=stages)
    ls.set_defaults(func=cmd_models_list)
    show = models_sub.add_parser("show", help="show one version: metrics, parameters, lineage")
    show.add_argument("stage", choices=stages)
    show.add_argument("version", type=_parse_version)
    show.set_defaults(func=cmd_models_show)
    promote = models_sub.add_parser(
        "promote",
        help="make a version the production model of its stage",
        description="Promote STAGE VERSION to production; the previous production version is "
        "archived in the same transaction. Workers switch on their next image.",
    )
    promote.add_argument("stage", choices=stages)
    promote.add_argument("version", type=_parse_version)
    promote.add_argument("--force", action="store_true",
                         help="promote even when it is worse on labelled images")
    add_who(promote)
    promote.set_defaults(func=cmd_models_promote)
    rollback = models_sub.add_parser(
        "rollback", help="go back to the previous production version of a stage"
    )
    rollback.add_argument("stage", choices=stages)
    add_who(rollback)
    rollback.set_defaults(func=cmd_models_rollback)
    _register_import(models_sub, stages)
    register_models(models_sub, stages, _parse_version, _parse_iso)


def _register_import(models_sub, stages: list[str]) -> None:
    imp = models_sub.add_parser(
        "import",
        help="wrap an existing Keras model (.keras or .h5) as a registered bundle",
        description="Register a model trained elsewhere so the workers can serve it. Its "
        "preprocessing is declared (applied by the loader, not inside the model).",
    )
    imp.add_argument("file", type=Path, help="a .keras or .h5 model")
    imp.add_argument("--stage", choices=stages, required=True)
    imp.add_argument("--classes", required=True,
                     help="class names in output order, e.g. NORMAL,PNEUMONIA")
    imp.add_argument("--input-size", type=int, required=True, help="square input size")
    imp.add_argument("--preprocess", required=True,
                     help="what the model expects applied to RGB 0-255 pixels: none, scale01, "
                     "tf, caffe, torch, efficientnet, or a backbone name (vgg16, xception, ...)")
    imp.add_argument("--logits", action="store_true", help="the model outputs raw logits")
    imp.add_argument("--resize", default="nearest",
                     choices=("nearest", "bilinear", "bicubic", "area", "lanczos", "box",
                              "hamming"),
                     help="how images were resized for the model (Pillow's filter on the full "
                     "image; default nearest, what keras.utils.load_img does)")
    imp.add_argument("--color-mode", choices=("rgb", "grayscale"), default=None,
                     help="what the model takes (default: from its input channels, 1 = "
                     "grayscale, 3 = rgb)")
    imp.add_argument("--threshold", type=float, default=0.5,
                     help="decision threshold on the probability of the second class")
    imp.add_argument("--promote", action="store_true", help="make it the production model")
    add_who(imp)
    imp.add_argument("--reference", type=Path, metavar="DIR",
                     help="a folder of this site's known-good chest X-rays (a few dozen; at "
                     "least 12): fit the input gate on them, so the workers refuse images "
                     "unlike them (pneumonia stage, RGB models)")
    imp.set_defaults(func=cmd_models_import)


def _parse_version(value: str) -> int:
    try:
        return int(value.lower().removeprefix("v"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a version number: {value!r}") from None


def cmd_models_list(args: argparse.Namespace, settings: Any) -> int:
    from db import registry
    from db.migrate import check_schema
    from db.session import session_scope

    check_schema(settings.db_url)
    with session_scope(settings.db_url) as session:
        rows = registry.list_versions(session, args.stage)
        table = [
            [
                m.stage,
                f"v{m.version}",
                f"{m.status}, shadow" if m.shadow else m.status,
                m.backbone,
                _metric(m.metrics, "auc"),
                _metric(m.metrics, "accuracy"),
                f"v{m.parent_version}" if m.parent_version else "",
                m.created_at.strftime("%Y-%m-%d %H:%M"),
            ]
            for m in rows
        ]
    headers = [
        "stage",
        "version",
        "status",
        "backbone",
        "test_auc",
        "test_acc",
        "parent",
        "created",
    ]
    print(format_table(headers, table) if table else "no models registered yet (see `cxr train`)")
    return 0


def _metric(metrics: dict[str, Any], name: str) -> str:
    value = (metrics.get("test") or metrics).get(name)
    if isinstance(value, dict):
        value = value.get("value")
    return f"{value:.3f}" if isinstance(value, int | float) else ""


def cmd_models_show(args: argparse.Namespace, settings: Any) -> int:
    from db import registry
    from db.migrate import check_schema
    from db.session import session_scope

    check_schema(settings.db_url)
    with session_scope(settings.db_url) as session:
        m = registry.get_version(session, args.stage, args.version)
        info = {
            "stage": m.stage,
            "version": m.version,
            "status": m.status,
            "backbone": m.backbone,
            "bundle": str(settings.models_path / m.bundle_path),
            "bundle_sha256": m.bundle_sha256,
            "parent_version": m.parent_version,
            "dataset_fingerprint": m.dataset_fingerprint,
            "code_version": m.code_version,
            "created_at": m.created_at.isoformat(),
            "promoted_at": m.promoted_at.isoformat() if m.promoted_at else None,
            "params": m.params,
            "metrics": m.metrics,
        }
    print(json.dumps(info, indent=2, default=str))
    return 0


def cmd_models_promote(args: argparse.Namespace, settings: Any) -> int:
    from db.migrate import check_schema
    from worker.cli.rollout import format_report
    from worker.ops.rollout import PromotionRefused, promote_guarded

    check_schema(settings.db_url)
    try:
        name, seen = promote_guarded(settings.db_url, args.stage, args.version,
                                     force=args.force, actor=args.by, reason=args.reason)
    except PromotionRefused as refused:
        if refused.comparison is not None:
            print(format_report(refused.comparison.report) + "\n")
        raise
    if seen is not None:
        print(format_report(seen.report) + "\n")
    print(f"{name} is now in production")
    _requeue_waiting(settings)
    return 0


def cmd_models_rollback(args: argparse.Namespace, settings: Any) -> int:
    from db.migrate import check_schema
    from worker.ops.rollout import rollback_audited

    check_schema(settings.db_url)
    name = rollback_audited(settings.db_url, args.stage, args.by, args.reason)
    print(f"rolled back: {name} is now in production")
    _requeue_waiting(settings)
    return 0


def _requeue_waiting(settings: Any) -> None:
    """Images parked as waiting_model go back to the queue now, not at the next reconcile."""
    from worker.inbox.intake import requeue_waiting

    try:
        n = requeue_waiting(settings)
    except Exception as exc:  # the broker may be down; the watcher's reconcile pass retries
        print(f"note: could not re-queue waiting images now ({exc}); the watcher will")
        return
    if n:
        print(f"re-queued {n} image(s) that were waiting for a model")


def cmd_models_import(args: argparse.Namespace, settings) -> int:
    from db.migrate import ensure_schema
    from trainer.training.importer import import_model

    if ensure_schema(settings.db_url):
        print("created the database schema (first use of this database)")
    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    version = import_model(
        args.file, stage=args.stage, class_names=classes, input_size=args.input_size,
        preprocess=args.preprocess, logits=args.logits, models_dir=settings.models_path,
        db_url=settings.db_url, threshold=args.threshold, promote=args.promote,
        resize=args.resize, color_mode=args.color_mode, reference=args.reference, say=print,
    )
    from db import audit
    from db.session import session_scope

    with session_scope(settings.db_url) as session:
        audit.record(session, "import", stage=args.stage, version=version,
                     detail={"file": args.file.name, "promoted": bool(args.promote)},
                     actor=args.by, reason=args.reason)
    status = "production" if args.promote else "candidate"
    print(f"imported {args.file} as {args.stage}/v{version} ({status}) "
          f"in {settings.models_path / args.stage / f'v{version}'}")
    return 0
