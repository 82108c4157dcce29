"""The review page: one self-contained HTML file of recent results for a clinician to read.

Everything is inside the file (images as data URIs, the style and a few lines of script
inline), so it opens from a disk or a mail attachment with no server; a Content-Security-Policy
lets the page load nothing else and run no other script. File names and reasons come from
strangers and are escaped. The page holds patient images and names: it is written 0600.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from PIL import Image

from db.vocabulary import DISCLAIMER, ImageStatus, Label
from trainer.imaging.checksum import new_digest
from worker.settings import Settings, printable

THUMBNAIL_PX = 224
NOT_CLASSIFIED = (ImageStatus.REJECTED, ImageStatus.FAILED)

STYLE = """
body{font-family:system-ui,sans-serif;margin:0;background:#f4f4f6;color:#1d1d22}
header{background:#1d1d22;color:#f4f4f6;padding:16px 24px}
h1{margin:0 0 4px;font-size:22px} main{padding:16px 24px}
.disclaimer{background:#fff3cd;border:1px solid #e0c060;padding:8px 12px;margin:12px 0;
font-weight:600}
.summary{display:flex;gap:32px;flex-wrap:wrap} .summary table{border-collapse:collapse}
.summary td,.summary th{padding:2px 10px;text-align:left}
.filters button{margin:4px 4px 4px 0;padding:4px 10px;border:1px solid #888;border-radius:4px;
background:#fff;cursor:pointer} .filters button.on{background:#1d1d22;color:#fff}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(320px,1fr));gap:16px}
.card{background:#fff;border-radius:6px;padding:12px;box-shadow:0 1px 3px #0003}
.card[hidden]{display:none} .card h2{font-size:14px;margin:0 0 8px;overflow-wrap:anywhere}
.card img{width:100%;height:auto;display:block;margin:4px 0;image-rendering:auto}
.review{color:#b91c1c;font-weight:700}
.label{font-size:20px;font-weight:700} .NORMAL{color:#1b7a3a} .PNEUMONIA{color:#b45309}
.BACTERIA{color:#b91c1c} .VIRUS{color:#7c3aed} .meta{font-size:13px;color:#444}
.nomap{font-size:12px;color:#777;margin:4px 0}
table.rejected{border-collapse:collapse;background:#fff} .rejected td,.rejected th{
border-bottom:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
"""

SCRIPT = """
document.querySelectorAll('.filters button').forEach(function (button) {
  button.addEventListener('click', function () {
    var wanted = button.dataset.label;
    document.querySelectorAll('.filters button').forEach(function (b) {
      b.classList.toggle('on', b === button);
    });
    var shown = 0;
    document.querySelectorAll('.card').forEach(function (card) {
      card.hidden = wanted !== 'ALL' && card.dataset.label !== wanted;
      if (!card.hidden) { shown += 1; }
    });
    document.getElementById('shown').textContent = String(shown);
  });
});
"""


def _sha256_source(text: str) -> str:
    """A CSP hash source for an inline block (the one SHA-256 of trainer.imaging.checksum)."""
    digest = new_digest()
    digest.update(text.encode())
    return "'sha256-" + base64.b64encode(digest.digest()).decode() + "'"


CSP = (f"default-src 'none'; img-src data:; style-src {_sha256_source(STYLE)}; "
       f"script-src {_sha256_source(SCRIPT)}; base-uri 'none'; form-action 'none'")


def _e(value: Any) -> str:
    return html.escape(printable(str(value)), quote=True)


def _data_uri(image: Image.Image, fmt: str = "JPEG") -> str:
    out = io.BytesIO()
    image.save(out, format=fmt, quality=85)
    mime = "jpeg" if fmt == "JPEG" else fmt.lower()
    return f"data:image/{mime};base64," + base64.b64encode(out.getvalue()).decode()


def thumbnail_uri(path: Path | None, max_pixels: int) -> str | None:
    """The image as a model sees it (``trainer.imaging.decode``), as a JPEG data URI; None if absent
    or unreadable."""
    from db.exceptions import BadImageError
    from trainer.imaging.decode import decode_image

    if path is None:
        return None
    try:
        return _data_uri(Image.fromarray(decode_image(path, THUMBNAIL_PX, max_pixels)))
    except (BadImageError, OSError):
        return None


def heatmap_uri(path: Path | None) -> str | None:
    """The heatmap panel of a stored heatmap picture as a JPEG data URI; None if absent."""
    from trainer.model.overlay import heatmap_panel

    if path is None or not path.is_file():
        return None
    try:
        with Image.open(path, formats=["PNG"]) as img:
            return _data_uri(heatmap_panel(img.convert("RGB")))
    except OSError:
        return None


def _when(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    value = value if value.tzinfo else value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _probability(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _card(row: dict[str, Any], thumb: str | None, heat: str | None) -> str:
    label = row["label"] or ""
    models = f"pneumonia/v{row['pneumonia_model']}" if row["pneumonia_model"] else ""
    if row["infection_model"]:
        models += f", infection/v{row['infection_model']}"
    parts = [
        f'<article class="card" data-label="{_e(label)}" data-id="{int(row["id"])}">',
        f"<h2>#{int(row['id'])} {_e(row['file_name'])}</h2>",
        f'<div class="label {_e(label)}">{_e(label)}</div>',
        f'<div class="meta">p(pneumonia) {_probability(row["p_pneumonia"])} &middot; '
        f"p(virus) {_probability(row['p_virus'])}</div>",
        f'<div class="meta">models: {_e(models)}</div>',
        *([f'<div class="review">review: {_e(row["review"])} (label inside the uncertain'
           ' band: a person decides)</div>'] if row.get("review") else []),
        f'<div class="meta">received {_e(_when(row["received_at"]))}, '
        f"done {_e(_when(row['finished_at']))}</div>",
    ]
    if thumb:
        parts.append(f'<img class="thumb" alt="the image as the model saw it" src="{thumb}">')
    if heat:
        parts.append(f'<img class="heatmap" alt="Grad-CAM heatmap" src="{heat}">')
    else:
        parts.append('<div class="nomap">no heatmap (made for pneumonia-positive results '
                     "when CXR_HEATMAPS is on, or by cxr explain)</div>")
    parts.append("</article>")
    return "\n".join(parts)


def _counts_table(title: str, counts: Counter, keys: Sequence[str]) -> str:
    rows = "".join(f"<tr><td>{_e(k)}</td><td>{counts.get(k, 0)}</td></tr>" for k in keys)
    return f"<table><tr><th colspan=2>{_e(title)}</th></tr>{rows}</table>"


def render_review(rows: list[dict[str, Any]], settings: Settings, *, since: datetime,
                  label: str | None = None, limit: int | None = None) -> str:
    """The page for ``rows`` (``db.results.review_rows``): a summary of all of them, a card per
    classified result (only ``label`` when given; the newest ``limit``), and the rejected and
    failed files with their reasons."""
    from worker.files.storage import stored_file

    by_label = Counter(r["label"] for r in rows if r["label"])
    by_status = Counter(r["status"] for r in rows)
    results = [r for r in rows if r["status"] == ImageStatus.DONE and r["label"]
               and (label is None or r["label"] == label)]
    shown = results[-limit:] if limit else results
    cards = []
    for row in shown:
        thumb = thumbnail_uri(stored_file(settings, row["stored_path"]),
                              settings.max_image_pixels)
        heat = None
        if row["heatmap_path"]:
            heat = heatmap_uri(settings.data_dir.absolute() / row["heatmap_path"])
        cards.append(_card(row, thumb, heat))
    refused = [r for r in rows if r["status"] in NOT_CLASSIFIED]
    refused_rows = "".join(
        f"<tr><td>#{int(r['id'])}</td><td>{_e(r['file_name'])}</td>"
        f"<td>{_e(r['status'])}{_e(' (' + r['review'] + ')' if r.get('review') else '')}</td>"
        f"<td>{_e(_when(r['received_at']))}</td><td>{_e(r['error'] or '')}</td></tr>"
        for r in refused)
    labels = [lab.value for lab in Label]
    buttons = "".join(f'<button type="button" data-label="{k}">{k}</button>'
                      for k in labels if any(r["label"] == k for r in shown))
    heading = f"{len(shown)} of {len(results)} result(s)" + (f" labelled {label}" if label
                                                                else "")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>cxr-triage review</title>
<style>{STYLE}</style></head>
<body>
<header><h1>cxr-triage review</h1>
<div>received since {_e(_when(since))}; written {_e(_when(datetime.now(UTC)))}</div></header>
<main>
<p class="disclaimer" id="disclaimer">{_e(DISCLAIMER)}</p>
<section class="summary" id="summary">
{_counts_table("label", by_label, labels)}
{_counts_table("status", by_status, [s.value for s in ImageStatus])}
</section>
<h2>{_e(heading)}; showing <span id="shown">{len(shown)}</span></h2>
<div class="filters"><button type="button" class="on" data-label="ALL">all</button>{buttons}</div>
<section class="cards" id="cards">
{chr(10).join(cards)}
</section>
<h2>Rejected and failed files ({len(refused)})</h2>
<table class="rejected" id="rejected"><tr><th>id</th><th>file</th><th>status</th>
<th>received</th><th>reason</th></tr>{refused_rows}</table>
<p class="disclaimer">{_e(DISCLAIMER)}</p>
</main>
<script>{SCRIPT}</script>
</body></html>
"""


def write_page(path: Path, page: str) -> None:
    """Write the page 0600 through a temporary file renamed into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(page)
    os.replace(tmp, path)
