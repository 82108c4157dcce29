"""`cxr explain IMAGE_ID... [--file PATH] [--out DIR]`: where the model looked (Grad-CAM).

For an image id, the prediction is explained with the model versions that made it, on its
archived file (hash-checked) decoded as the worker decoded it; for ``--file``, the production
models classify the file first. Each PNG shows the image as the model saw it, the heatmap over
it, and the label, probabilities and model version in the margin.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from db.exceptions import CxrError
from db.vocabulary import DISCLAIMER
from worker.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "explain",
        help="draw where the model looked (a Grad-CAM heatmap PNG) for results or files",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("image_ids", nargs="*", type=int, metavar="IMAGE_ID",
                   help="ids from `cxr results`")
    p.add_argument("--file", action="append", type=Path, default=[], metavar="PATH",
                   help="classify this JPEG or PNG with the production models and explain it "
                   "(repeatable)")
    p.add_argument("--out", type=Path, default=Path("."),
                   help="folder for the PNGs (default: the current folder)")
    p.set_defaults(func=cmd_explain)


def cmd_explain(args: argparse.Namespace, settings: Settings) -> int:
    if not args.image_ids and not args.file:
        raise CxrError("name at least one IMAGE_ID (see `cxr results`) or --file PATH")
    args.out.mkdir(parents=True, exist_ok=True)
    failures = 0
    if args.image_ids:
        failures += _explain_images(args.image_ids, args.out, settings)
    if args.file:
        failures += _explain_files(args.file, args.out, settings)
    print(DISCLAIMER)
    return 1 if failures else 0


def _write(path: Path, data: bytes) -> None:
    """0600: the picture holds the patient's image."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _archived(row, settings: Settings) -> tuple[bytes | None, str | None]:
    """(the archived file's bytes, checked against the hash intake recorded) or (None, why)."""
    from db.vocabulary import ImageStatus
    from worker.classify.reading import read_archived

    if row is None:
        return None, "no such image"
    if row.status != ImageStatus.DONE or row.label is None:
        return None, f"not classified ({row.status}{': ' + row.error if row.error else ''})"
    return read_archived(settings, row.stored_path, row.sha256)


def _explain_images(image_ids: list[int], out: Path, settings: Settings) -> int:
    from db import registry
    from db.images import image_results
    from db.migrate import check_schema
    from db.session import session_scope
    from trainer.imaging.decode import decode_bytes
    from worker.classify.heatmaps import explain_results, render
    from worker.classify.inference import CascadeResult, Models, load_registered

    check_schema(settings.db_url)
    failures = 0
    with session_scope(settings.db_url) as session:
        found = image_results(session, image_ids)
        loaded: dict[int, object] = {}

        def stage(model_id: int | None):
            if model_id is not None and model_id not in loaded:
                row = registry.get_by_id(session, model_id)
                loaded[model_id] = load_registered(settings.models_path, row)
            return loaded.get(model_id)

        for image_id in image_ids:
            row = found.get(image_id)
            data, problem = _archived(row, settings)
            if problem is not None:
                failures += 1
                print(f"image {image_id}: {problem}")
                continue
            models = Models(stage(row.pneumonia_model_id), stage(row.infection_model_id))

            def pixels(feed, data=data):
                return decode_bytes(data, feed.size, settings.max_image_pixels,
                                    resize=feed.resize)[None]

            result = CascadeResult(row.label, row.p_pneumonia, row.p_virus)
            heatmap = explain_results(models, [result], pixels(models.pneumonia.feed),
                                      lambda _, feed: pixels(feed))[0]
            target = out / f"image-{image_id}-heatmap.png"
            _write(target, render(result, heatmap, subject=f"image {image_id}"))
            print(f"image {image_id}: {row.label} -> {target}")
    return failures


def _explain_files(files: list[Path], out: Path, settings: Settings) -> int:
    from db.exceptions import BadImageError
    from worker.classify.heatmaps import explain_results, render
    from worker.classify.inference import classify_file, production_models

    models = production_models(settings.models_path, settings.db_url)
    failures = 0
    for path in files:
        try:
            pixels, stage_two, result = classify_file(path, models, settings.max_image_pixels)
        except (BadImageError, OSError) as exc:
            failures += 1
            print(f"{path}: rejected: {exc}")
            continue
        if result.label is None:  # refused by the input gate: nothing to explain
            failures += 1
            print(f"{path}: out_of_scope: {result.reason}")
            continue
        heatmap = explain_results(models, [result], pixels[None], stage_two)[0]
        target = out / f"{path.stem}-heatmap.png"
        _write(target, render(result, heatmap))
        print(f"{path}: {result.label} -> {target}")
    return failures
