"""``cxr up | watch | worker | classify``: the inference side of the command line."""

from __future__ import annotations

import argparse
from pathlib import Path

from worker.settings import Settings


def _serve_own_metrics(settings: Settings, role: str) -> None:
    """Run alone (not under `cxr up`, which serves its children's): serve this process's
    metrics. Before any instrument is imported, which fixes prometheus_client's mode."""
    import os

    if settings.metrics_port and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from worker.ops.metrics_server import prepare_dir, serve

        path = prepare_dir(settings, role)
        if path is not None:
            serve(settings, path)


def cmd_watch(args: argparse.Namespace, settings: Settings) -> int:
    _serve_own_metrics(settings, "watch")
    from worker.inbox.watcher import watch

    return watch(settings, polling=args.polling)


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    _serve_own_metrics(settings, "worker")
    from worker.classify.celery_app import RESCORE_SUFFIX, app

    argv = [
        "worker",
        f"--concurrency={args.concurrency or settings.worker_concurrency}",
        f"--queues={args.queues or settings.queue + ',' + settings.queue + RESCORE_SUFFIX}",
        f"--loglevel={settings.log_level}",
        f"--pool={args.pool}",
        "--without-mingle",
    ]
    app.worker_main(argv)
    return 0


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    from worker.ops.supervisor import up

    web = (settings.web_in_up or args.web) and not args.no_web
    if web:
        from worker.web.auth import check_web_settings

        check_web_settings(settings)  # refuse an open review app before starting anything
    return up(settings, flower=not args.no_flower, polling=args.polling,
              concurrency=args.concurrency, web=web)


def cmd_classify(args: argparse.Namespace, settings: Settings) -> int:
    from db.exceptions import BadImageError
    from db.vocabulary import DISCLAIMER
    from worker.classify.inference import classify_file, production_models

    models = production_models(settings.models_path, settings.db_url)
    versions = f"pneumonia/v{models.pneumonia.version}"
    if models.infection is not None:
        versions += f" infection/v{models.infection.version}"
    print(f"models: {versions}")
    failures = 0
    for name in args.files:
        path = Path(name)
        try:
            _, _, result = classify_file(path, models, settings.max_image_pixels)
        except (BadImageError, OSError) as exc:
            failures += 1
            print(f"{name}\trejected: {exc}")
            continue
        if result.label is None:  # refused by the input gate: no label
            failures += 1
            print(f"{name}\tout_of_scope: {result.reason}")
            continue
        p_virus = "-" if result.p_virus is None else f"{result.p_virus:.3f}"
        flag = f"\treview={result.review}" if result.review else ""
        print(f"{name}\t{result.label}\tp_pneumonia={result.p_pneumonia:.3f}\tp_virus={p_virus}"
              f"{flag}")
    print(DISCLAIMER)
    return 1 if failures else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "up",
        help="run watcher, worker(s) and Flower in the foreground (Ctrl-C stops all)",
        description="Supervise the watcher, inference worker(s) and Flower on this machine: "
        "starts a private Redis when none answers at CXR_BROKER_URL, creates a brand-new "
        "database's schema, restarts a child that dies, and stops everything on Ctrl-C.",
    )
    p.add_argument("--no-flower", action="store_true", help="do not start Flower")
    p.add_argument("--web", action="store_true",
                   help="also run the review app, `cxr web` (CXR_WEB_IN_UP=true does too)")
    p.add_argument("--no-web", action="store_true", help="do not run the review app")
    p.add_argument("--polling", action="store_true", help="watcher polls (network filesystems)")
    p.add_argument("--concurrency", type=int, help="worker processes (CXR_WORKER_CONCURRENCY)")
    p.set_defaults(func=cmd_up)

    p = subparsers.add_parser(
        "watch",
        help="watch the inbox and enqueue every complete file",
        description="Watch CXR_INBOX (recursively): each complete file is hashed, moved into "
        "the archive, recorded and enqueued. A periodic reconcile scan catches missed events "
        "and re-enqueues rows left behind.",
    )
    p.add_argument("--polling", action="store_true",
                   help="use the polling observer (NFS/SMB shares give no inotify events)")
    p.set_defaults(func=cmd_watch)

    p = subparsers.add_parser(
        "worker",
        help="run a Celery inference worker (same as celery -A worker worker)",
        description="Consume the inference queue: two-stage classification with the "
        "production models, results written to the database.",
    )
    p.add_argument("--concurrency", "-c", type=int,
                   help="worker processes (default CXR_WORKER_CONCURRENCY)")
    p.add_argument("--queues", "-Q", help="comma-separated queues (default CXR_QUEUE, then "
                   "CXR_QUEUE.rescore: re-scores after live images)")
    p.add_argument("--pool", default="prefork", choices=["prefork", "solo", "threads"],
                   help="Celery pool (default prefork)")
    p.set_defaults(func=cmd_worker)

    p = subparsers.add_parser(
        "classify",
        help="classify files now with the production models (no queue, nothing recorded)",
        description="Decode and classify each FILE synchronously with the production models "
        "and print label, p_pneumonia, p_virus and the model versions.",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="JPEG, PNG or DICOM chest X-ray")
    p.set_defaults(func=cmd_classify)
