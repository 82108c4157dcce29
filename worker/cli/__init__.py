"""The ``cxr`` command: one argparse parser, one module per group of subcommands.

Each module in ``COMMAND_MODULES`` has ``register(subparsers)``; every handler has the
signature ``handler(args, settings) -> int``. All parsing and presentation lives in this
package; heavy imports (TensorFlow) stay inside handlers so ``cxr --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from db.vocabulary import DISCLAIMER

COMMAND_MODULES = [
    "worker.cli.demo",  # demo
    "worker.cli.pipeline",  # up, watch, worker, classify
    "worker.cli.flower",  # flower
    "worker.cli.db",  # db upgrade|current, results
    "worker.cli.explain",  # explain
    "worker.cli.report",  # report
    "worker.cli.models",  # models list|show|promote|rollback|import|shadow|compare|history
    "worker.cli.rollout",  # rescore
    "worker.cli.train",  # synth, train
    "worker.cli.bench",  # bench
    "worker.cli.config",  # settings
    "worker.cli.dicom",  # dicom listen|echo|outbox|send

    "worker.cli.labels",  # labels import|add|export
    "worker.cli.monitor",  # monitor
    "worker.cli.web",  # web, web hash-password
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cxr",
        description="cxr-triage: chest X-ray triage (NORMAL / BACTERIA / VIRUS). " + DISCLAIMER,
        epilog="Settings come from CXR_* environment variables or a .env file; see the README.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


NEEDS_MODELS = frozenset({"train", "classify", "demo", "bench", "models import", "explain"})
"""Commands that load Keras in this process (``cxr worker`` loads it in its pool children)."""


def main(argv: list[str] | None = None) -> int:
    from db.exceptions import CxrError
    from trainer.model.runtime import load_backend, quiet_native_logs
    from worker.settings import Settings

    args = build_parser().parse_args(argv)
    settings = Settings()
    quiet_native_logs(debug=settings.log_level.upper() == "DEBUG")
    command = " ".join(filter(None, [args.command, getattr(args, "models_command", None),
                                       getattr(args, "dicom_command", None)]))
    if command in NEEDS_MODELS:
        load_backend()
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        if command != "settings":
            settings.check_urls()
        return int(args.func(args, settings) or 0)
    except CxrError as exc:
        print(f"cxr: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
