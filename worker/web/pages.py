"""The review app's pages: the worklist (HTML, CSV, JSON for live updates), an image, its
pictures, labelling it, and the models. Routes stay thin: queries live in ``db.worklist``.

Images and heatmaps are addressed by the row id alone (an ``int`` path parameter, so a path
never reaches a handler); what file they come from is read from the database.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from datetime import date, datetime
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import (
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route

from db.exceptions import LabelError
from db.session import session_scope
from db.vocabulary import DISCLAIMER, FINAL_STATUSES, STAGE_CLASSES, ImageStatus, Label
from db.worklist import Filters
from worker.web.app import checked_form, png_or_404, render, signed_in

REVIEW_FLAGS = ("uncertain", "out_of_scope", "none")
CSV_COLUMNS = ("id", "received_at", "status", "label", "p_pneumonia", "p_virus", "review",
               "gate_score", "pneumonia_model", "infection_model", "accession_number",
               "study_instance_uid", "truth", "file_name")
LIVE_COLUMNS = ("id", "received_at", "status", "label", "p_pneumonia", "p_virus", "review",
                "gate_score", "pneumonia_model", "infection_model", "accession_number",
                "study_instance_uid", "truth")


def _choice(value: str | None, allowed) -> str | None:
    return value if value in {str(a) for a in allowed} else None


def _date(value: str | None) -> date | None:
    try:
        return date.fromisoformat(value) if value else None
    except ValueError:
        return None


def _int(value: str | None) -> int | None:
    return int(value) if value and value.isdigit() and len(value) < 12 else None


def filters_of(request: Request) -> Filters:
    """The worklist filters a query string asks for (unknown values are ignored)."""
    q = request.query_params
    return Filters(status=_choice(q.get("status"), ImageStatus),
                   label=_choice(q.get("label"), Label),
                   review=_choice(q.get("review"), REVIEW_FLAGS),
                   since=_date(q.get("since")), until=_date(q.get("until")),
                   version=_int(q.get("version")))


def _query_string(filters: Filters) -> str:
    from urllib.parse import urlencode

    values = {k: v for k, v in vars(filters).items() if v not in (None, "")}
    return urlencode({k: str(v) for k, v in values.items()})


def _db(request: Request) -> str:
    return request.app.state.settings.db_url


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in row.items()}


@signed_in()
async def worklist_page(request: Request) -> Response:
    from db.worklist import view_columns, worklist

    filters = filters_of(request)
    before = _int(request.query_params.get("before"))

    def read():
        with session_scope(_db(request)) as session:
            return worklist(session, filters, before), view_columns(session)

    rows, columns = await run_in_threadpool(read)
    return render(request, "worklist.html", rows=rows, filters=filters, before=before,
                  query=_query_string(filters), has_review="review" in columns,
                  has_gate="gate_score" in columns, statuses=list(ImageStatus),
                  labels=list(Label), flags=REVIEW_FLAGS, final=[str(s) for s in FINAL_STATUSES])


@signed_in(page=False)
async def worklist_json(request: Request) -> Response:
    """Rows newer than ``after`` and the current state of ``ids``: the page's live updates."""
    from db.worklist import by_ids, newer

    filters = filters_of(request)
    after = _int(request.query_params.get("after")) or 0
    ids = [int(i) for i in request.query_params.get("ids", "").split(",")[:200] if i.isdigit()]

    def read():
        with session_scope(_db(request)) as session:
            return newer(session, filters, after), by_ids(session, ids)

    new, known = await run_in_threadpool(read)
    return JSONResponse({"new": [_live(r) for r in new], "rows": [_live(r) for r in known]})


def _live(row: dict[str, Any]) -> dict[str, Any]:
    plain = _plain(row)
    return {c: plain.get(c) for c in LIVE_COLUMNS}


def _csv_cell(value: Any) -> str:
    """A cell a spreadsheet will not run: text starting = + - @ gets a leading quote."""
    text = "" if value is None else value.isoformat() if isinstance(value, datetime) else str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def _csv_lines(db_url: str, filters: Filters) -> Iterator[str]:
    from db.worklist import iter_worklist

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["# " + DISCLAIMER])
    writer.writerow(CSV_COLUMNS)
    with session_scope(db_url) as session:
        for n, row in enumerate(iter_worklist(session, filters)):
            writer.writerow([_csv_cell(row.get(c)) for c in CSV_COLUMNS])
            if n % 500 == 0:
                yield buffer.getvalue()
                buffer.seek(0)
                buffer.truncate()
    yield buffer.getvalue()


@signed_in(page=False)
async def worklist_csv(request: Request) -> Response:
    headers = {"content-disposition": 'attachment; filename="worklist.csv"'}
    return StreamingResponse(_csv_lines(_db(request), filters_of(request)),
                             media_type="text/csv; charset=utf-8", headers=headers)


def _image_context(settings, image_id: int) -> dict[str, Any] | None:
    from db.worklist import image_detail, labels_of, neighbours, predictions_of, view_columns

    with session_scope(settings.db_url) as session:
        row = image_detail(session, image_id)
        if row is None:
            return None
        newer_id, older_id = neighbours(session, image_id)
        stages = [("pneumonia", row["p_pneumonia"], row["threshold"], row["pneumonia_model"],
                   STAGE_CLASSES["pneumonia"]),
                  ("infection", row["p_virus"], row["infection_threshold"],
                   row["infection_model"], STAGE_CLASSES["infection"])]
        return {"row": row, "stages": stages, "predictions": predictions_of(session, image_id),
                "given": labels_of(session, image_id), "newer_id": newer_id,
                "older_id": older_id, "has_review": "review" in view_columns(session),
                "choices": [str(label) for label in Label]}


@signed_in()
async def image_page(request: Request) -> Response:
    context = await run_in_threadpool(_image_context, request.app.state.settings,
                                      request.path_params["image_id"])
    if context is None:
        return PlainTextResponse("no such image", status_code=404)
    return render(request, "image.html", **context)


def _input_png(settings, image_id: int) -> tuple[bytes | None, str | None]:
    from db import registry
    from db.worklist import image_detail
    from worker.web.pictures import model_feed, model_input_png

    with session_scope(settings.db_url) as session:
        row = image_detail(session, image_id)
        if row is None:
            return None, "no such image"
        model = (registry.get_by_id(session, row["pneumonia_model_id"])
                 if row["pneumonia_model_id"] else registry.get_production(session, "pneumonia"))
    feed = model_feed(settings, model.bundle_path if model else None)
    return model_input_png(settings, row["stored_path"], row["sha256"], feed)


@signed_in(page=False)
async def input_picture(request: Request) -> Response:
    data, problem = await run_in_threadpool(_input_png, request.app.state.settings,
                                            request.path_params["image_id"])
    return png_or_404(data, problem or "no picture")


def _heatmap(settings, image_id: int) -> bytes | None:
    from db.worklist import image_detail
    from worker.web.pictures import heatmap_png

    with session_scope(settings.db_url) as session:
        row = image_detail(session, image_id)
    return heatmap_png(settings, row["heatmap_path"]) if row else None


@signed_in(page=False)
async def heatmap_picture(request: Request) -> Response:
    data = await run_in_threadpool(_heatmap, request.app.state.settings,
                                   request.path_params["image_id"])
    return png_or_404(data, "no heatmap for this image")


def _add_label(db_url: str, image_id: int, label: str, user: str) -> int | None:
    """The older neighbour to go on to, after storing ``label`` as a review by ``user``."""
    from db.labels import add_label
    from db.worklist import neighbours

    with session_scope(db_url) as session:
        add_label(session, image_id, label, "review", user)
        return neighbours(session, image_id)[1]


@signed_in(page=False)
async def label_image(request: Request) -> Response:
    form = await checked_form(request)
    if form is None:
        return PlainTextResponse("bad or missing CSRF token", status_code=403)
    image_id = request.path_params["image_id"]
    label = form.get("label", "")
    try:
        older = await run_in_threadpool(_add_label, _db(request), image_id, label,
                                        request.state.user)
    except LabelError as exc:
        return PlainTextResponse(str(exc), status_code=400)
    verb = "agreed" if form.get("verdict") == "agree" else "corrected to"
    request.session["flash"] = f"image {image_id}: {verb} {label.upper()}"
    target = older if older is not None and form.get("advance") == "1" else image_id
    return RedirectResponse(f"/image/{target}", status_code=303)


def routes() -> list[Route]:
    return [
        Route("/", worklist_page, methods=["GET"]),
        Route("/worklist.csv", worklist_csv, methods=["GET"]),
        Route("/api/worklist", worklist_json, methods=["GET"]),
        Route("/image/{image_id:int}", image_page, methods=["GET"]),
        Route("/image/{image_id:int}/input.png", input_picture, methods=["GET"]),
        Route("/image/{image_id:int}/heatmap.png", heatmap_picture, methods=["GET"]),
        Route("/image/{image_id:int}/label", label_image, methods=["POST"]),
    ]
