"""``cxr dicom listen | echo | outbox | send``: the DICOM network from the command line."""

from __future__ import annotations

import argparse
import signal
import threading

from worker.settings import Settings


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def cmd_listen(args: argparse.Namespace, settings: Settings) -> int:
    from worker.dicom.listener import listen

    settings.ensure_dirs()
    return listen(settings, _stop_on_signals())


def cmd_echo(args: argparse.Namespace, settings: Settings) -> int:
    from worker.dicom.listener import quiet_pynetdicom
    from worker.dicom.peers import parse_destination
    from worker.dicom.scu import SendError, echo

    quiet_pynetdicom()
    peer = parse_destination(args.peer, "cxr dicom echo")
    try:
        echo(peer, settings.dicom_ae_title, timeout=args.timeout)
    except SendError as exc:
        print(f"echo failed: {exc}")
        return 1
    print(f"{peer}: echo ok")
    return 0


def cmd_send(args: argparse.Namespace, settings: Settings) -> int:
    from worker.dicom.sender import run_sender

    return run_sender(settings, _stop_on_signals(), once=args.once)


def cmd_outbox(args: argparse.Namespace, settings: Settings) -> int:
    from db.outbox import outbox_rows
    from db.session import session_scope
    from worker.cli.format import format_table

    with session_scope(settings.db_url) as session:
        rows = outbox_rows(session, state=args.state, limit=args.limit)
    headers = ["id", "image_id", "kind", "destination", "state", "attempts", "next_try_at",
               "sent_at", "last_error"]
    print(format_table(headers, [["" if r[h] is None else r[h] for h in headers] for r in rows]))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("dicom", help="the DICOM network: listen, echo, outbox, send",
                              description="Receive images by DICOM C-STORE into the inbox and "
                              "send results back (SR, heatmap SC) through a durable outbox.")
    sub = p.add_subparsers(dest="dicom_command", metavar="SUBCOMMAND", required=True)
    q = sub.add_parser("listen", help="run the C-STORE listener (CXR_DICOM_PORT) into the inbox")
    q.set_defaults(func=cmd_listen)
    q = sub.add_parser("echo", help="C-ECHO a DICOM peer: AE@host:port")
    q.add_argument("peer", metavar="AE@HOST:PORT")
    q.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    q.set_defaults(func=cmd_echo)
    q = sub.add_parser("outbox", help="what the sender has pending, sent or failing, and why")
    q.add_argument("--state", choices=["pending", "sent", "failing"], help="only these rows")
    q.add_argument("--limit", type=int, default=50, help="rows (default 50, newest first)")
    q.set_defaults(func=cmd_outbox)
    q = sub.add_parser("send", help="run the sender: results of finished images as DICOM SR "
                       "(and heatmap SC) to CXR_DICOM_DESTINATIONS / CXR_DICOM_EXPORT_DIR")
    q.add_argument("--once", action="store_true", help="one pass, then exit")
    q.set_defaults(func=cmd_send)
