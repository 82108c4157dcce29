"""The review app, driven in a real Chromium (the distribution's, through Playwright) against
`cxr web` running as a real server process on a free port: sign in, filter, open an image,
toggle the heatmap, agree with one result and correct another, see a new result arrive live;
and the refusals: no session, a bad CSRF token, a path in place of an id.

With CXR_SCREENSHOTS=docs the two README screenshots are written to docs/.
"""

from __future__ import annotations

import http.client
import os
from pathlib import Path

import pytest
from helpers_browser import find_browser
from helpers_web import ROOT, free_port, seed, start_app, stop_app

from db.labels import current_labels
from db.migrate import upgrade
from db.models import GroundTruth
from db.session import dispose_engines, session_scope
from worker.web.auth import hash_password

playwright = pytest.importorskip("playwright.sync_api")
BROWSER = find_browser()
pytestmark = [pytest.mark.slow, pytest.mark.timeout(180),
              pytest.mark.skipif(BROWSER is None, reason="no Chromium installed")]
PASSWORD = "correct horse battery"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    data = tmp_path_factory.mktemp("web") / "var"
    data.mkdir(mode=0o700)
    db_url = f"sqlite:///{data / 'cxr.db'}"
    upgrade(db_url)
    ids = seed(db_url, data)
    port = free_port()
    env = {"CXR_DATA_DIR": str(data), "CXR_DATABASE_URL": db_url,
           "CXR_WEB_USERS": f"alice:{hash_password(PASSWORD)}"}
    env.pop("CXR_WEB_SECRET", None)
    proc = start_app(env, port, data.parent / "web.log")
    try:
        yield {"base": f"http://127.0.0.1:{port}", "port": port, "db_url": db_url,
               "ids": ids, "data": data}
    finally:
        stop_app(proc)
        dispose_engines()


def _shot(page, name: str, tmp_path: Path) -> None:
    folder = ROOT / "docs" if os.environ.get("CXR_SCREENSHOTS") == "docs" else tmp_path
    page.screenshot(path=str(folder / name))


def _add_result(db_url: str, data: Path) -> int:
    """One more finished image, as a worker would write it while the page is open."""
    with session_scope(db_url) as session:
        from db.images import record_image
        from db.vocabulary import ImageStatus

        return record_image(session, sha256="f" * 64, file_name="late.png", stored_path=None,
                            size_bytes=1, status=ImageStatus.FAILED, error="test").id


def test_sign_in_filter_open_toggle_agree_correct_and_live(app, tmp_path):
    base, errors = app["base"], []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=BROWSER, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 640})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("response", lambda r: errors.append(r.url) if r.status >= 400 else None)
        page.goto(base + "/")
        assert page.url == base + "/login"
        page.fill("#user", "alice")
        page.fill("#password", PASSWORD)
        page.click("#sign-in")
        page.wait_for_url(base + "/")
        assert page.locator("#worklist tbody tr[data-id]").count() == 5
        assert "not a medical device" in page.inner_text("#disclaimer")

        page.select_option("#f-label", "BACTERIA")
        page.click("#apply")
        page.wait_for_url("**label=BACTERIA**")
        labels = page.locator("#worklist td.label").all_inner_texts()
        assert labels == ["BACTERIA", "BACTERIA"]
        assert "ACC4715" in page.inner_text("#worklist")
        _shot(page, "web-worklist.png", tmp_path)

        newest = app["ids"][-1]
        page.click(f'#worklist a[href="/image/{newest}"]')
        page.wait_for_url(f"{base}/image/{newest}")
        page.wait_for_function("document.getElementById('input').complete")
        assert page.evaluate("document.getElementById('input').naturalWidth") == 48
        assert page.is_hidden("#heatmap")
        assert "1.2.826.0.1.3680043.8.498.1004" in page.inner_text("#identifiers")
        page.click("#toggle-heatmap")
        assert page.is_visible("#heatmap") and page.is_hidden("#input")
        page.wait_for_function("document.getElementById('heatmap').naturalWidth === 64")
        _shot(page, "web-image.png", tmp_path)

        page.keyboard.press("a")  # agree: BACTERIA, then on to the next older image
        older = app["ids"][-2]
        page.wait_for_url(f"{base}/image/{older}")
        assert "agreed BACTERIA" in page.inner_text("#flash")
        page.keyboard.press("3")  # the third choice, VIRUS, for a NORMAL result
        page.wait_for_url(f"{base}/image/{app['ids'][-3]}")
        page.keyboard.press("k")
        page.wait_for_url(f"{base}/image/{older}")
        assert "VIRUS" in page.inner_text("#labels")

        page.goto(base + "/")
        late = _add_result(app["db_url"], app["data"])
        page.wait_for_selector(f'#worklist tr[data-id="{late}"]', timeout=20_000)
        page.keyboard.press("j")
        page.keyboard.press("Enter")
        page.wait_for_url(f"{base}/image/{late}")

        page.click("header a[href='/models']")
        assert page.locator("#models tr.production").count() == 2
        page.wait_for_function(
            "() => [...document.images].every(i => i.complete && i.naturalWidth > 0)")
        assert page.locator(".plots img").count() >= 2  # cxr monitor's plots, drawn live
        browser.close()
    assert errors == []
    with session_scope(app["db_url"]) as session:
        truth = current_labels(session, app["ids"][-2:])
        rows = session.query(GroundTruth).order_by(GroundTruth.id).all()
        given = [(r.image_id, r.label, r.source, r.labelled_by) for r in rows]
    assert truth == {app["ids"][-1]: "BACTERIA", app["ids"][-2]: "VIRUS"}
    assert given == [(app["ids"][-1], "BACTERIA", "review", "alice"),
                     (app["ids"][-2], "VIRUS", "review", "alice")]


def _request(app, method: str, path: str, body: str = "", cookie: str = ""
             ) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", app["port"], timeout=10)
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if cookie:
        headers["Cookie"] = cookie
    conn.request(method, path, body=body, headers=headers)
    response = conn.getresponse()
    response.read()
    conn.close()
    return response


def _sign_in(app, password: str = PASSWORD) -> http.client.HTTPResponse:
    """The login form's cookie and CSRF token, then the sign-in POST."""
    import re

    conn = http.client.HTTPConnection("127.0.0.1", app["port"], timeout=10)
    conn.request("GET", "/login")
    response = conn.getresponse()
    csrf = re.search(r'name="csrf" value="([^"]+)"', response.read().decode()).group(1)
    cookie = response.getheader("set-cookie").split(";")[0]
    body = f"csrf={csrf}&user=alice&password={password.replace(' ', '+')}"
    return _request(app, "POST", "/login", body, cookie)


def _signed_in_cookie(app) -> str:
    response = _sign_in(app)
    assert response.status == 303
    return response.getheader("set-cookie").split(";")[0]


def test_refusals(app):
    image = app["ids"][0]
    assert _request(app, "GET", "/api/worklist").status == 401
    assert _request(app, "GET", f"/image/{image}/input.png").status == 401
    assert _request(app, "GET", "/worklist.csv").status == 401
    page = _request(app, "GET", "/")
    assert page.status == 303 and page.getheader("location") == "/login"
    assert _request(app, "POST", f"/image/{image}/label", "label=NORMAL").status == 401
    cookie = _signed_in_cookie(app)
    assert _request(app, "GET", f"/image/{image}/input.png", cookie=cookie).status == 200
    _csv_and_json_follow_the_filters(app, cookie)
    forged = _request(app, "POST", f"/image/{image}/label", "csrf=forged&label=NORMAL", cookie)
    assert forged.status == 403
    assert _request(app, "POST", f"/image/{image}/label", "label=NORMAL", cookie).status == 403
    for path in ("/image/..%2F..%2Fcxr.db/input.png", "/image/%2Fetc%2Fpasswd/heatmap.png",
                 "/image/archive%2Fab/input.png", "/image/1.5/input.png"):
        assert _request(app, "GET", path, cookie=cookie).status == 404, path
    with session_scope(app["db_url"]) as session:
        assert image not in current_labels(session, [image])
    assert _request(app, "POST", "/login", "csrf=x&user=alice&password=guess").status == 403
    assert _sign_in(app, "guess").status == 401
    for _ in range(4):  # five wrong passwords in a row pause sign-in for that user
        assert _sign_in(app, "guess").status == 401
    assert _sign_in(app).status == 429
    headers = _request(app, "GET", "/login")
    assert "frame-ancestors 'none'" in headers.getheader("content-security-policy")
    assert headers.getheader("x-frame-options") == "DENY"
    assert "httponly" in headers.getheader("set-cookie").lower()
    assert "samesite=strict" in headers.getheader("set-cookie").lower()


def test_a_proxy_header_names_the_user(tmp_path):
    """Behind a reverse proxy (CXR_WEB_TRUSTED_HEADER) the header is the user; without it,
    nothing is served."""
    data = tmp_path / "var"
    db_url = f"sqlite:///{data / 'cxr.db'}"
    data.mkdir()
    upgrade(db_url)
    image = seed(db_url, data, n=1)[0]
    port = free_port()
    proc = start_app({"CXR_DATA_DIR": str(data), "CXR_DATABASE_URL": db_url,
                      "CXR_WEB_TRUSTED_HEADER": "X-Forwarded-User", "CXR_WEB_USERS": ""},
                     port, tmp_path / "web.log")
    app = {"port": port}
    try:
        assert _request(app, "GET", "/api/worklist").status == 401
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", f"/image/{image}", headers={"X-Forwarded-User": "dr.b"})
        response = conn.getresponse()
        page = response.read().decode()
        assert response.status == 200 and "dr.b" in page
        import re

        csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
        cookie = response.getheader("set-cookie").split(";")[0]
        conn.request("POST", f"/image/{image}/label", body=f"csrf={csrf}&label=VIRUS",
                     headers={"X-Forwarded-User": "dr.b", "Cookie": cookie,
                              "Content-Type": "application/x-www-form-urlencoded"})
        assert conn.getresponse().status == 303
        conn.close()
    finally:
        stop_app(proc)
    with session_scope(db_url) as session:
        rows = session.query(GroundTruth).all()
        assert [(r.image_id, r.label, r.labelled_by) for r in rows] == [(image, "VIRUS", "dr.b")]
    dispose_engines()


def test_without_sign_in_only_this_machine_is_answered(tmp_path):
    """On loopback with no users the app answers as `local`, but only to requests naming this
    machine: a site re-pointing its DNS name at 127.0.0.1 (DNS rebinding) gets nothing."""
    data = tmp_path / "var"
    data.mkdir()
    db_url = f"sqlite:///{data / 'cxr.db'}"
    upgrade(db_url)
    seed(db_url, data, n=1)
    port = free_port()
    proc = start_app({"CXR_DATA_DIR": str(data), "CXR_DATABASE_URL": db_url,
                      "CXR_WEB_USERS": "", "CXR_WEB_TRUSTED_HEADER": ""},
                     port, tmp_path / "web.log")
    try:
        for host, status in (("127.0.0.1", 200), ("localhost", 200), ("evil.example", 400)):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/", headers={"Host": f"{host}:{port}"})
            response = conn.getresponse()
            body = response.read().decode()
            conn.close()
            assert response.status == status, host
            assert status != 200 or ">local<" in body
    finally:
        stop_app(proc)
    dispose_engines()


def _csv_and_json_follow_the_filters(app, cookie: str) -> None:
    import csv
    import json

    conn = http.client.HTTPConnection("127.0.0.1", app["port"], timeout=10)
    conn.request("GET", "/worklist.csv?label=BACTERIA", headers={"Cookie": cookie})
    response = conn.getresponse()
    lines = response.read().decode().splitlines()
    assert response.status == 200 and "attachment" in response.getheader("content-disposition")
    assert "not a medical device" in lines[0]
    rows = list(csv.DictReader(lines[1:]))
    assert [int(r["id"]) for r in rows] == [app["ids"][4], app["ids"][1]]
    assert {r["label"] for r in rows} == {"BACTERIA"} and rows[0]["accession_number"]
    conn.request("GET", f"/api/worklist?after={app['ids'][2]}", headers={"Cookie": cookie})
    new = json.loads(conn.getresponse().read())["new"]
    assert [r["id"] for r in new][-2:] == [app["ids"][4], app["ids"][3]]
    conn.close()
