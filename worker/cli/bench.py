"""``cxr bench``: ceiling, notebook way, pipeline and latency in one run (see worker.ops.bench)."""

from __future__ import annotations

import argparse
from pathlib import Path

from worker.settings import Settings


def cmd_bench(args: argparse.Namespace, settings: Settings) -> int:
    if args.dicom:
        from worker.ops.bench_dicom import run_dicom_bench

        result = run_dicom_bench(args.dicom, settings, associations=args.associations,
                                 redis_db=args.redis_db, work_dir=args.work_dir)
        if args.out:
            write_json_file(result, args.out)
        return 0
    from worker.ops.bench import format_table, run_bench, write_json
    from worker.ops.bench_inputs import BenchConfig

    cfg = BenchConfig(
        backbone=args.backbone,
        img_size=args.img_size,
        images=args.images,
        batch_size=args.batch_size or settings.batch_size,
        message_size=args.message_size or settings.message_size,
        burst=args.burst,
        notebook_images=args.notebook_images,
        latency_images=args.latency_images,
        latency_gap_s=args.latency_gap,
        stable_seconds=settings.stable_seconds if args.stable_seconds is None
        else args.stable_seconds,
        source_px=tuple(args.source_px),
        min_time_s=args.min_time,
        work_dir=args.work_dir,
        redis_db=args.redis_db,
        heatmaps=args.heatmaps,
        shadow=args.shadow,
        baseline=args.baseline or "",
        perf=args.perf,
    )
    result = run_bench(cfg, settings, progress=lambda line: print(line, flush=True))
    print()
    print(format_table(result))
    if args.out:
        write_json(result, args.out)
        print(f"\nwrote {args.out}")
    return 0


def write_json_file(result: dict, path: Path) -> None:
    import json

    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        help="measure forward-pass ceiling, notebook way, pipeline throughput and latency",
        description="In one run on this machine: the model's forward throughput on decoded "
        "tensors (best batch size), the decode throughput of the same files (one thread per "
        "core), the notebooks' load_img + model.predict loop, the real "
        "stack (cxr up with one worker, private data dir, SQLite, a private Redis queue) from "
        "K files copied into the inbox to K rows done (and the CPU an image each of its "
        "processes used), inbox-to-done latency at low load, and "
        "what a heatmap (CXR_HEATMAPS: Grad-CAM and its PNG) costs on the same tensors. "
        "Prints a table with the ratios and optionally writes JSON. Random weights.",
    )
    p.add_argument("--backbone", default="mobilenetv2",
                   help="backbone (default mobilenetv2), or 'free': pooling and one dense layer, "
                   "to measure the control plane and decoding alone")
    p.add_argument("--img-size", type=int, default=224, help="model input size (default 224)")
    p.add_argument("--images", type=int, default=200, help="files for the pipeline run (K)")
    p.add_argument("--batch-size", type=int,
                   help="images per forward pass in the worker (default CXR_BATCH_SIZE)")
    p.add_argument("--message-size", type=int,
                   help="images per message (default CXR_MESSAGE_SIZE)")
    p.add_argument("--burst", type=int, default=0,
                   help="also time the watcher alone taking a burst of N files (default 0: skip)")
    p.add_argument("--notebook-images", type=int, default=40,
                   help="files for the one-by-one notebook loop (default 40)")
    p.add_argument("--latency-images", type=int, default=12,
                   help="files dropped one at a time for latency (default 12)")
    p.add_argument("--latency-gap", type=float, default=1.0,
                   help="seconds between latency drops (default 1.0)")
    p.add_argument("--stable-seconds", type=float,
                   help="watcher quiet period for the stack (default CXR_STABLE_SECONDS)")
    p.add_argument("--source-px", type=int, nargs=2, default=(900, 1400), metavar=("MIN", "MAX"),
                   help="side of the synthetic source X-rays in pixels (default 900 1400)")
    p.add_argument("--min-time", type=float, default=2.0,
                   help="seconds per ceiling batch-size measurement (default 2)")
    p.add_argument("--redis-db", type=int, default=12,
                   help="Redis database number for the bench's private queue (default 12)")
    _add_extras(p)
    p.add_argument("--work-dir", type=Path, help="keep files, database and stack.log here "
                   "(by default a temporary folder, removed after a good run)")
    p.add_argument("--out", type=Path, help="write the results as JSON to this file")
    p.set_defaults(func=cmd_bench)


def _add_extras(p: argparse.ArgumentParser) -> None:
    """What a run can add: heatmaps, a shadow, the user's script, a perf profile, or DICOM."""
    p.add_argument("--heatmaps", action="store_true",
                   help="run the pipeline with CXR_HEATMAPS on and every image positive (the "
                   "worst case); the heatmap cost on tensors is measured either way")
    p.add_argument("--dicom", type=int, metavar="N",
                   help="instead: send N DICOM instances with storescu to `cxr dicom listen` "
                   "and time them until their rows are recorded (the way in alone)")
    p.add_argument("--associations", type=int, default=4,
                   help="with --dicom: storescu runs at once (default 4)")
    p.add_argument("--shadow", action="store_true",
                   help="also run a second bundle of the same backbone as a shadow version: "
                   "its cost on the same tensors, and the pipeline run with it")
    p.add_argument("--baseline", choices=["script"],
                   help="also run the tf.data script a user would write instead (decode_jpeg "
                   "in parallel, resize, batch 32, predict_on_batch) on the same files and "
                   "model, as written and with tf.data's autotuner off (which on two cores "
                   "often pins it near 195 images/s), and print service / script against "
                   "the fastest pass")
    p.add_argument("--perf", action="store_true",
                   help="record every CPU with Linux perf during the run and print where each "
                   "image's CPU went in the pipeline and the script (by process: watcher, "
                   "worker, idle...; and by library: libjpeg, Pillow, SHA-256, Python, "
                   "kernel...); needs perf and root or kernel.perf_event_paranoid=-1")
