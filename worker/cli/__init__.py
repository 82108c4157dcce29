"""The ``cxr`` command: one argparse parser, subcommands contributed by each package.

Each module in ``COMMAND_MODULES`` has ``register(subparsers)`` and may have
``register_models(models_subparsers)`` for `cxr models ...` actions; every handler has the
signature ``handler(args, settings) -> int``. Heavy imports (TensorFlow) stay inside handlers
so ``cxr --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

COMMAND_MODULES = [
    "worker.cli.demo",  # demo
    "worker.cli.pipeline",  # up, watch, worker, classify
    "worker.cli.flower",  # flower
    "db.cli",  # db upgrade, results, models list/show/promote/rollback
    "trainer.cli",  # synth, train, models import
    "worker.cli.bench",  # bench
    "worker.cli.config",  # settings
]

DISCLAIMER = "Decision support only, not a medical device."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cxr",
        description="cxr-triage: chest X-ray triage (NORMAL / BACTERIA / VIRUS). " + DISCLAIMER,
        epilog="Settings come from CXR_* environment variables or a .env file; see the README.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    modules = []
    for name in COMMAND_MODULES:
        try:
            modules.append(importlib.import_module(name))
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
    for module in modules:
        module.register(sub)
    models = sub.add_parser(
        "models",
        help="model registry: list, show, promote, rollback, import",
        description="Versioned model bundles per stage (pneumonia, infection).",
    )
    models_sub = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    for module in modules:
        if hasattr(module, "register_models"):
            module.register_models(models_sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter
    from worker.exceptions import CxrError
    from worker.settings import Settings

    args = build_parser().parse_args(argv)
    settings = Settings()
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        return int(args.func(args, settings) or 0)
    except CxrError as exc:
        print(f"cxr: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
