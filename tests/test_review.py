"""`cxr report` (worker.ops.review_page): one self-contained HTML page of recent results, read back
by a real headless Chromium: it loads without a script error or a blocked resource, shows every card
with its images decoded, the summary, the rejected files and the disclaimer, and its filter
works. A file name written to attack the page stays text.
"""

from __future__ import annotations

import re
import stat
from datetime import UTC, datetime, timedelta

import pytest
from helpers_browser import Browser, find_browser
from helpers_models import register_tiny_bundle
from test_heatmaps import _drop

from db.vocabulary import DISCLAIMER
from worker.classify.batch import process_images
from worker.classify.inference import ModelCache
from worker.settings import Settings

HOSTILE = '<img src=x onerror="document.title=1">.png'


@pytest.fixture
def browser():
    executable = find_browser()
    if executable is None:
        pytest.skip("no Chromium here: `make test` installs it (apt-get install chromium)")
    with Browser(executable) as b:
        yield b


@pytest.fixture
def reviewed(tmp_path, db_url, monkeypatch):
    """A data dir with two positives (heatmaps on), a NORMAL, a rejected file and one with a
    hostile name, and `cxr report` run on it; returns (settings, page path, printed)."""
    from worker.cli import main

    settings = Settings(data_dir=tmp_path / "var", database_url=db_url, heatmaps=True)
    settings.ensure_dirs()
    register_tiny_bundle(settings.db_url, settings.models_path, "pneumonia", conv=True)
    register_tiny_bundle(settings.db_url, settings.models_path, "infection", conv=True,
                         bias=-20.0)
    ids = [_drop(settings, "bright.png", 210, spot=(4, 4)), _drop(settings, "dark.png", 20),
           _drop(settings, "broken.jpeg", None), _drop(settings, HOSTILE, 230)]
    process_images(ids, settings, ModelCache(settings.models_path))
    monkeypatch.setenv("CXR_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("CXR_DATABASE_URL", settings.db_url)
    page = tmp_path / "review.html"
    since = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    assert main(["report", "--since", since, "--out", str(page)]) == 0
    return settings, page


def test_the_page_is_self_contained_private_and_escaped(reviewed):
    _, page = reviewed
    html = page.read_text()
    assert stat.S_IMODE(page.stat().st_mode) == 0o600
    assert html.count('<article class="card"') == 3
    assert DISCLAIMER in html
    assert "http://" not in html and "https://" not in html and "<img src=x" not in html
    assert "&lt;img src=x onerror=&quot;document.title=1&quot;&gt;.png" in html
    assert len(re.findall(r'src="data:image/jpeg;base64,', html)) == 3 + 2  # thumbs, heatmaps


def test_the_page_in_a_real_browser(reviewed, browser):
    _, page = reviewed
    view = browser.load(page)
    assert view.errors() == []
    assert view.evaluate("document.querySelectorAll('.card').length") == 3
    assert view.evaluate("document.querySelectorAll('.card img.thumb').length") == 3
    assert view.evaluate("document.querySelectorAll('.card img.heatmap').length") == 2
    assert view.evaluate("Array.from(document.images).every(i => i.complete && "
                         "i.naturalWidth > 0)")  # every data URI decodes
    assert view.evaluate("Array.from(document.querySelectorAll('img.heatmap')).every("
                         "i => i.naturalWidth === i.naturalHeight)")  # the heatmap panel
    labels = view.evaluate("Array.from(document.querySelectorAll('.card')).map("
                           "c => c.dataset.label).sort()")
    assert labels == ["BACTERIA", "BACTERIA", "NORMAL"]
    summary = view.evaluate("document.getElementById('summary').innerText")
    assert re.search(r"BACTERIA\s+2", summary) and re.search(r"rejected\s+1", summary)
    assert re.search(r"done\s+3", summary)
    rejected = view.evaluate("document.getElementById('rejected').innerText")
    assert "broken.jpeg" in rejected and "rejected" in rejected
    disclaimer = view.evaluate("document.getElementById('disclaimer').getBoundingClientRect()"
                               ".height")
    assert disclaimer > 0
    assert view.evaluate("document.title") == "cxr-triage review"  # the hostile name is text
    assert view.evaluate(f"document.body.innerText.includes({HOSTILE!r})")
    view.evaluate("document.querySelector('.filters button[data-label=NORMAL]').click()")
    assert view.evaluate("document.getElementById('shown').textContent") == "1"
    assert view.evaluate("Array.from(document.querySelectorAll('.card')).filter("
                         "c => !c.hidden).map(c => c.dataset.label)") == ["NORMAL"]
    assert view.errors() == []


def test_the_browser_check_sees_a_script_error_and_a_blocked_load(tmp_path, browser):
    """The check above can fail: a broken script and a resource the policy blocks are seen."""
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><meta http-equiv="Content-Security-Policy" '
                    "content=\"default-src 'none'; script-src 'unsafe-inline'\">"
                    '<img src="http://example.invalid/x.png"><script>missing();</script>')
    errors = browser.load(page).errors()
    assert any("missing is not defined" in e for e in errors), errors
    assert any("Content Security Policy" in e for e in errors), errors


def test_label_filter_and_limit_keep_the_summary(reviewed, capsys):
    from worker.cli import main

    settings, page = reviewed
    since = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    assert main(["report", "--since", since, "--label", "normal", "--out", str(page)]) == 0
    html = page.read_text()
    assert html.count('<article class="card"') == 1 and 'data-label="NORMAL"' in html
    assert "broken.jpeg" in html  # rejected files stay listed
    assert main(["report", "--since", since, "--limit", "1", "--out", str(page)]) == 0
    assert page.read_text().count('<article class="card"') == 1
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert main(["report", "--since", later, "--out", str(page)]) == 0
    assert page.read_text().count('<article class="card"') == 0
    assert "0 card(s) of 0 file(s)" in capsys.readouterr().out.splitlines()[-1]
