"""`cxr web [--address A] [--port P]` and `cxr web hash-password`: the review app."""

from __future__ import annotations

import argparse
import getpass
import sys

from worker.settings import Settings


def run_web(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from worker.web.app import create_app

    overrides = {"web_address": args.address, "web_port": args.port}
    settings = settings.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    app = create_app(settings)  # refuses an open app beyond loopback before listening
    print(f"review app on http://{settings.web_address}:{settings.web_port}/", flush=True)
    uvicorn.run(app, host=settings.web_address, port=settings.web_port, proxy_headers=False,
                server_header=False, log_level=settings.log_level.lower())
    return 0


def hash_password(args: argparse.Namespace, settings: Settings) -> int:
    from worker.web.auth import hash_password as make_hash

    if sys.stdin.isatty():
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            print("the passwords differ", file=sys.stderr)
            return 2
    else:
        password = sys.stdin.readline().rstrip("\n")
    encoded = make_hash(password)
    print(f"{args.user}:{encoded}" if args.user else encoded)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "web",
        help="run the review app (worklist, images, confirm or correct) in the foreground",
        description="Serve the review app on CXR_WEB_ADDRESS:CXR_WEB_PORT (default "
        "127.0.0.1:8000). Beyond loopback it needs CXR_WEB_USERS (hashes from `cxr web "
        "hash-password`) or CXR_WEB_TRUSTED_HEADER set by a reverse proxy.",
    )
    parser.add_argument("--address", help="listen address (overrides CXR_WEB_ADDRESS)")
    parser.add_argument("--port", type=int, help="listen port (overrides CXR_WEB_PORT)")
    parser.set_defaults(func=run_web)
    sub = parser.add_subparsers(dest="web_command", metavar="SUBCOMMAND")
    hashing = sub.add_parser(
        "hash-password", help="print a password hash for CXR_WEB_USERS (reads the password "
        "from the terminal, or one line of standard input)")
    hashing.add_argument("--user", help="print name:hash, ready for CXR_WEB_USERS")
    hashing.set_defaults(func=hash_password)
