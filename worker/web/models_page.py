"""The models page: every registered version, which is production, and `cxr monitor`'s live
figures (each version on its labelled images, drift alarms) and plots, drawn on request."""

from __future__ import annotations

import tempfile
from pathlib import Path

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from db.session import session_scope
from worker.web.app import png_or_404, render, signed_in

FIGURES = ("n_labelled", "sensitivity", "specificity", "accuracy", "auc", "cascade_accuracy",
           "review_share")


def _report(settings) -> dict:
    from worker.ops.monitor import build_report

    return build_report(settings.db_url, psi_threshold=settings.monitor_psi)


def _page(settings) -> dict:
    from db import registry

    with session_scope(settings.db_url) as session:
        versions = registry.list_versions(session)
    report = _report(settings)
    return {"versions": versions, "figures": {v["model"]: v for v in report["versions"]},
            "alarms": report["drift"]["alarms"], "figure_names": FIGURES,
            "plots": _plot_count(report)}


def _plot_count(report: dict) -> int:
    """How many PNGs ``write_plots`` draws for ``report`` (weekly per version, then drift)."""
    weekly = [v for v in report["versions"] if v["stage"] == "pneumonia" and v["weeks"]]
    return len(weekly) + bool(report["drift"]["days"])


@signed_in()
async def models_page(request: Request) -> Response:
    context = await run_in_threadpool(_page, request.app.state.settings)
    return render(request, "models.html", **context)


def _plot_png(settings, index: int) -> bytes | None:
    from worker.ops.monitor_plots import write_plots

    report = _report(settings)
    with tempfile.TemporaryDirectory(prefix="cxr-web-plots-") as folder:
        paths = write_plots(report, Path(folder))
        return paths[index].read_bytes() if index < len(paths) else None


@signed_in(page=False)
async def plot(request: Request) -> Response:
    """The monitor's n-th plot (weekly figures per version, then drift), by number only."""
    data = await run_in_threadpool(_plot_png, request.app.state.settings,
                                   request.path_params["index"])
    return png_or_404(data, "no such plot")


def routes() -> list[Route]:
    return [Route("/models", models_page, methods=["GET"]),
            Route("/models/plot/{index:int}.png", plot, methods=["GET"])]
