"""`cxr demo`: the whole product on synthetic X-rays, from nothing, in one command.

Generate a data set, train and promote both stages with the small backbone, start the stack
(`cxr up`: Redis if needed, watcher, worker with heatmaps on, Flower, the review app), drop
held-out images into the inbox, wait for every result, print them with a summary, draw where
the model looked for one of them (`cxr explain`), write the review page (`cxr report`), and
stop (unless --keep-running); the last line says where the review app (`cxr web`) is.
"""

from __future__ import annotations

import argparse
import base64
import json
import secrets
import shutil
import sys
import time
import urllib.request
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

from db.vocabulary import DISCLAIMER, FINAL_STATUSES, Review
from worker.ops.stack import LocalStack
from worker.settings import Settings

OUT_OF_SCOPE = Review.OUT_OF_SCOPE.value
BORDERLINE_POOL = 40
"""Held-out films tried, in this process as the worker would answer them, to find one inside
an uncertain band (the demo shows that flag)."""

SYNTHETIC_NOTE = (
    "Models here are trained on SYNTHETIC images in a few minutes: they show how the service "
    "works and are NOT for clinical use."
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole product end to end on synthetic X-rays (about 5 minutes)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--n", type=int, default=1500, help="synthetic training images (default 1500)")
    p.add_argument("--images", type=int, default=30, help="images dropped into the inbox")
    p.add_argument("--img-size", type=int, default=64, help="model input size (default 64)")
    p.add_argument("--epochs", type=int, default=12, help="training epochs per stage")
    p.add_argument("--reuse-models", action="store_true",
                   help="skip training when both stages already have production models")
    p.add_argument("--keep-running", action="store_true",
                   help="leave watcher, worker and Flower running after the demo")
    p.add_argument("--timeout", type=float, default=300, help="seconds to wait for results")
    p.add_argument("--no-rollout", action="store_true",
                   help="skip the second act: train a new version, shadow, compare, promote, "
                   "re-score")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from db.migrate import upgrade

    print(f"cxr demo: {SYNTHETIC_NOTE} {DISCLAIMER}", flush=True)
    started = time.monotonic()
    if not settings.flower_basic_auth:
        password = secrets.token_urlsafe(9)
        settings = settings.model_copy(update={"flower_basic_auth": f"demo:{password}"})
    web_password = _web_user(settings)
    settings.ensure_dirs()
    upgrade(settings.db_url)
    if not (args.reuse_models and _has_production_models(settings)):
        data = _synthetic_dataset(settings, args.n)
        _train_both(settings, data, args)
    log_path = settings.data_dir.absolute() / "logs" / "demo-stack.log"
    print(f"\n[{_elapsed(started)}] starting the stack (cxr up); its log: {log_path}", flush=True)
    stack = _start_stack(settings, log_path, web_password)
    try:
        if not _wait_for_flower(settings, stack):
            print("Flower did not answer; continuing without it", flush=True)
        names = _drop_images(settings, args.images, borderline=True)
        print(f"[{_elapsed(started)}] copied {len(names)} held-out images into "
              f"{settings.inbox_dir}", flush=True)
        dropped_at = datetime.now(UTC) - timedelta(seconds=5)
        rows = _wait_for_results(settings, names, stack, args.timeout)
        _report(settings, rows, names)
        _report_flower(settings, set(names))
        _explain_and_review(settings, rows, dropped_at)
        if not args.no_rollout:
            from worker.cli.demo_rollout import rollout_act

            rollout_act(settings, _synthetic_dataset(settings, args.n), args, _drop_images,
                        _wait_for_results, stack, names)
    finally:
        if args.keep_running:
            print(f"\nthe stack keeps running (cxr up, pid {stack.pid}); stop it with "
                  f"kill -INT {stack.pid}")
        else:
            _stop_stack(stack)
    print(f"\ndemo finished in {_elapsed(started)}. {SYNTHETIC_NOTE} {DISCLAIMER}")
    print(_web_address(settings, web_password, args.keep_running))
    return 0


def _web_user(settings: Settings) -> str | None:
    """A password for the demo's review app user ``demo`` (None when users are configured)."""
    if settings.web_users or settings.web_trusted_header:
        return None
    return secrets.token_urlsafe(9)


def _web_address(settings: Settings, password: str | None, running: bool) -> str:
    """The last line of the demo: where the review app is (or how to start it)."""
    url = f"http://{settings.web_address}:{settings.web_port}/"
    if running:
        who = f" (user 'demo', password {password!r})" if password else ""
        return f"review app: {url}{who}"
    return f"review app: run `cxr web`, then open {url} (signs in as 'local' on loopback)"


def _elapsed(started: float) -> str:
    seconds = int(time.monotonic() - started)
    return f"{seconds // 60}:{seconds % 60:02d}"


def _has_production_models(settings: Settings) -> bool:
    from db import registry
    from db.session import session_scope

    with session_scope(settings.db_url) as session:
        return all(registry.has_production(session, s) for s in ("pneumonia", "infection"))


def _synthetic_dataset(settings: Settings, n: int) -> Path:
    """A synthetic Kaggle-layout data set under the data dir (reused when it already exists)."""
    from trainer.synth.xrays import generate_dataset

    root = settings.data_dir.absolute() / f"synthetic-{n}"
    if not (root / "train").exists():
        print(f"writing {n} synthetic images to {root}", flush=True)
        generate_dataset(root, n, seed=0)
    return root


def _train_both(settings: Settings, data: Path, args: argparse.Namespace) -> None:
    from worker.cli import build_parser

    argv = [
        "train", "--data", str(data), "--stage", "both", "--backbone", "smallcnn",
        "--weights", "none", "--img-size", str(args.img_size), "--epochs", str(args.epochs),
        "--fine-tune-epochs", "0", "--promote",
    ]
    train_args = build_parser().parse_args(argv)
    print("\n$ cxr " + " ".join(argv), flush=True)
    train_args.func(train_args, settings)


def _start_stack(settings: Settings, log_path: Path, web_password: str | None) -> LocalStack:
    from worker.ops.supervisor import child_env
    from worker.web.auth import hash_password

    env = child_env(settings)
    env["CXR_FLOWER_BASIC_AUTH"] = settings.flower_basic_auth or ""
    env["CXR_HEATMAPS"] = "true"  # the worker draws where it looked for each positive result
    env["CXR_WEB_IN_UP"] = "true"  # the review app, at the address the demo prints last
    if web_password:
        env["CXR_WEB_USERS"] = f"demo:{hash_password(web_password)}"
    return LocalStack(env, log_path)


def _stop_stack(stack: LocalStack) -> None:
    if stack.running():
        print("\nstopping the stack", flush=True)
    stack.stop(timeout=60)


def _drop_images(settings: Settings, n: int, borderline: bool = False) -> dict[str, str]:
    """Copy held-out synthetic images into the inbox, one synthetic hand radiograph that the
    input gate should refuse and, with ``borderline``, one film the production models answer
    inside an uncertain band (named ``borderline-...``); returns file name -> true label
    (``out_of_scope`` for the hand)."""
    from trainer.synth.wrong_inputs import write_wrong_inputs
    from trainer.synth.xrays import held_out_images

    staging = settings.data_dir.absolute() / "demo-staging"
    shutil.rmtree(staging, ignore_errors=True)
    seed = int(time.time())  # new content each run, so nothing is answered from an old run
    images = [(path, label, path.name) for path, label in held_out_images(staging, n, seed=seed)]
    images += [(path, OUT_OF_SCOPE, path.name) for path, _ in
               write_wrong_inputs(staging / "wrong", 1, seed=seed, kinds=("hand",))]
    found = _borderline_film(settings, staging / "pool", seed + 1) if borderline else None
    if found is not None:
        images.append((found[0], found[1], f"borderline-{found[0].name}"))
    for path, _, name in images:
        shutil.copy(path, settings.inbox_dir / name)
    shutil.rmtree(staging, ignore_errors=True)
    return {name: label for _, label, name in images}


def _borderline_film(settings: Settings, staging: Path, seed: int) -> tuple[Path, str] | None:
    """A held-out film that the production models, run here exactly as the worker runs them
    (gate, calibration, band), answer inside an uncertain band; None when the pool has none
    or the models have no band."""
    from trainer.synth.xrays import held_out_images
    from worker.classify.inference import classify_file, production_models

    models = production_models(settings.models_path, settings.db_url)
    if not models.pneumonia.calibration:
        return None
    for path, label in held_out_images(staging, BORDERLINE_POOL, seed=seed):
        _, _, result = classify_file(path, models, settings.max_image_pixels)
        if (getattr(result, "review", None) or "").startswith("uncertain"):
            return path, label
    return None


def _wait_for_results(
    settings: Settings, names: dict[str, str], stack: LocalStack, timeout: float
) -> list[dict]:
    from tqdm import tqdm

    from db.results import list_results
    from db.session import session_scope

    deadline = time.monotonic() + timeout
    with tqdm(total=len(names), desc="classified", unit="img") as bar:
        while True:
            with session_scope(settings.db_url) as session:
                rows = [r for r in list_results(session, limit=None) if r["file_name"] in names]
            finished = [r for r in rows if r["status"] in FINAL_STATUSES]
            bar.update(len(finished) - bar.n)
            if len(finished) == len(names):
                return finished
            if not stack.running():
                raise SystemExit(f"cxr up exited with code {stack.returncode}; see its log")
            if time.monotonic() > deadline:
                bar.close()
                print(f"timed out: {len(finished)} of {len(names)} finished", file=sys.stderr)
                return rows
            time.sleep(0.5)


def _report(settings: Settings, rows: list[dict], truth: dict[str, str]) -> None:
    from sqlalchemy.engine import make_url

    from db.session import redacted_url
    from worker.cli.format import format_results_table

    rows = sorted(rows, key=lambda r: r["id"])
    print()
    print(format_results_table(rows))
    labels = Counter(r["label"] or r["status"] for r in rows)
    print("\nper class: " + ", ".join(f"{k} {v}" for k, v in sorted(labels.items())))
    agree = sum(1 for r in rows if (r["label"] or r.get("review")) == truth.get(r["file_name"]))
    print(f"agreement with the synthetic ground truth: {agree}/{len(rows)}")
    _report_review(rows)
    url = make_url(settings.db_url)
    if url.get_backend_name() == "sqlite":
        print(f"database: {url.database}  (try: sqlite3 {url.database} 'select * from results')")
    else:
        print(f"database: {redacted_url(settings.db_url)} (view: results)")
    user, _, password = (settings.flower_basic_auth or "").partition(":")
    print(f"Flower: http://{settings.flower_address}:{settings.flower_port}/ while the stack "
          f"runs (user {user!r}, password {password!r})")


def _report_review(rows: list[dict]) -> None:
    """What needs a person (``cxr results --review``): the image the gate refused, and any
    label inside its stage's uncertain band."""
    refused = [r for r in rows if r.get("review") == OUT_OF_SCOPE]
    unsure = [r for r in rows if (r.get("review") or "").startswith("uncertain")]
    print("\nneeds a person (cxr results --review):")
    for r in refused:
        print(f"  {r['file_name']}: no label, {r['error']}")
    for r in unsure:
        print(f"  {r['file_name']}: {r['label']} kept but flagged {r['review']} "
              f"(p_pneumonia {r['p_pneumonia']:.3f}, inside the band)")
    if not unsure:
        print("  no label fell inside an uncertain band this time (the band is where the "
              "validation errors were; a clear-cut synthetic set has few)")


def _explain_and_review(settings: Settings, rows: list[dict], since: datetime) -> None:
    """`cxr explain` one positive result (a BACTERIA one when there is: stage 2 points at a
    consolidation) and `cxr report` on the demo's results; print where they are."""
    from worker.cli import build_parser

    out = settings.data_dir.absolute() / "demo"
    positive = sorted((r for r in rows if r["label"] and r["label"] != "NORMAL"),
                      key=lambda r: (r["label"] != "BACTERIA", r["id"]))
    stored = sum(1 for r in rows if r.get("heatmap_path"))
    print(f"\nheatmaps: the worker drew {stored} (CXR_HEATMAPS=true), under "
          f"{settings.heatmaps_dir}")
    commands = [["report", "--since", since.isoformat(timespec="seconds"),
                 "--out", str(out / "review.html")]]
    if positive:
        commands.insert(0, ["explain", str(positive[0]["id"]), "--out", str(out)])
    else:
        print("no pneumonia-positive result to draw a heatmap for")
    for argv in commands:
        print("$ cxr " + " ".join(argv), flush=True)
        parsed = build_parser().parse_args(argv)
        parsed.func(parsed, settings)
    print(f"open {out / 'review.html'} in a browser: every result with its heatmap")


def _report_flower(settings: Settings, names: set[str], timeout: float = 30.0) -> None:
    """Read Flower's API: every demo image should be named by a task (one task per batch)."""
    from worker.classify.celery_app import CLASSIFY_TASK

    request = _flower_request(settings, "/api/tasks?limit=100000")
    deadline = time.monotonic() + timeout
    seen: list[dict] = []
    covered: set[str] = set()
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                tasks = json.load(response).values()
        except OSError:
            time.sleep(0.5)
            continue
        seen = [t for t in tasks if any(repr(n) in (t.get("args") or "") for n in names)]
        covered = {n for n in names for t in seen if repr(n) in (t.get("args") or "")}
        if len(covered) >= len(names) and all(t.get("state") == "SUCCESS" for t in seen):
            break
        time.sleep(0.5)
    states = Counter(t.get("state") for t in seen)
    summary = ", ".join(f"{k} {v}" for k, v in sorted(states.items(), key=str)) or "none"
    print(f"Flower saw {len(covered)} of the {len(names)} demo images in {len(seen)} "
          f"{CLASSIFY_TASK} task(s) ({summary})")


def _flower_request(settings: Settings, path: str) -> urllib.request.Request:
    url = f"http://{settings.flower_address}:{settings.flower_port}{path}"
    request = urllib.request.Request(url)
    if settings.flower_basic_auth:
        token = base64.b64encode(settings.flower_basic_auth.encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    return request


def _wait_for_flower(settings: Settings, stack: LocalStack, timeout: float = 60) -> bool:
    """Flower only sees events sent while it listens: drop images once a worker's heartbeat
    has reached it (`status=1` answers from Flower's event state, not from a broadcast)."""
    request = _flower_request(settings, "/api/workers?status=1")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and stack.running():
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                if any(json.loads(response.read() or b"{}").values()):
                    return True
        except (OSError, ValueError):
            pass
        time.sleep(0.5)
    return False
