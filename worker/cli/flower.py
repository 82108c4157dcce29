"""``cxr flower``: the Celery monitoring web UI, in the foreground."""

from __future__ import annotations

import argparse

from worker.settings import Settings


def run_flower(args: argparse.Namespace, settings: Settings) -> int:
    from worker.ops.flower import check_flower_settings, exec_flower

    overrides = {"flower_address": args.address, "flower_port": args.port}
    settings = settings.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    check_flower_settings(settings)
    print(f"Flower on http://{settings.flower_address}:{settings.flower_port}/", flush=True)
    exec_flower(settings)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "flower",
        help="Run Celery Flower (workers, queues, tasks) in the foreground.",
        description=(
            "Run Celery Flower against the CXR_BROKER_URL broker, on CXR_FLOWER_ADDRESS:"
            "CXR_FLOWER_PORT (default 127.0.0.1:5555), with basic auth from "
            "CXR_FLOWER_BASIC_AUTH=user:password. The password and the broker URL are passed "
            "through the environment, never on the command line."
        ),
    )
    parser.add_argument("--address", help="listen address (overrides CXR_FLOWER_ADDRESS)")
    parser.add_argument("--port", type=int, help="listen port (overrides CXR_FLOWER_PORT)")
    parser.set_defaults(func=run_flower)
