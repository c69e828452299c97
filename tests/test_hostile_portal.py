"""Hostile requests to the portal found by an outside review: bodies nobody may make the portal
read (no login, no CSRF token, no length), fill sheets that are YAML bombs, searches whose
wildcards would backtrack for minutes, and repeating-group tags in includefield.

A body "not read" is shown by declaring a gigabyte, sending a few bytes, and getting the refusal
at once: a server that read the body first would wait for the rest.
"""

from __future__ import annotations

import random
import re
import socket

import pytest

from corelab.fill_sheets import SheetMalformed, check_form
from portal.app import create_app
from services.dicomweb_match import DicomwebError, MAX_STARS, _text_match, parse_query
from tests.portal_helpers import build_portal_lab, client_for, csrf_of, served_portal
from tests.stow_helpers import _token

GIB = 1 << 30


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    return build_portal_lab(tmp_path_factory.mktemp("hostile-portal"))


@pytest.fixture(scope="module")
def base_url(lab):
    with served_portal(lab.settings) as url:
        yield url


def _refused_at_once(base_url: str, head: str) -> tuple[int, bytes]:
    """Send ``head`` (a request's headers) and 1 KiB of a body declared far larger; the answer's
    status and body, which must come before the rest of the body (the socket times out otherwise)."""
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(head.encode() + b" " * 1024)
        sock.settimeout(10)
        data = b""
        while b"\r\n\r\n" not in data or not data.split(b"\r\n\r\n", 1)[1]:
            got = sock.recv(65536)
            if not got:
                break
            data += got
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[1]


@pytest.mark.parametrize("path, content_type", [
    ("/upload/zip", "application/json"),  # a JSON body model: FastAPI reads it before the login check
    ("/login", "multipart/form-data; boundary=x"),  # a form: Starlette spools it to /tmp
    ("/api/sites", "application/json"),
])
def test_a_gigabyte_body_without_login_is_refused_before_it_is_read(base_url, path, content_type):
    status, body = _refused_at_once(base_url, f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
                                              f"Content-Length: {GIB}\r\n\r\n")
    assert status == 413 and b"over the limit" in body and b"/dicomweb/studies" in body


def test_a_body_of_unknown_length_is_refused_where_no_route_streams(base_url):
    status, body = _refused_at_once(base_url, "POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                              "Transfer-Encoding: chunked\r\n\r\n")
    assert status == 411 and b"Content-Length" in body


def test_a_session_without_csrf_token_cannot_make_stow_read_a_form(lab, base_url):
    """A logged-in site session posting a multipart/form-data body to STOW-RS without the CSRF
    header: refused (403) at once, the form is never parsed (STOW's own limits do not apply to forms)."""
    import httpx
    with httpx.Client(base_url=base_url) as client:
        form = client.get("/login")
        client.post("/login", data={"name": "site-a", "password": "correct horse battery staple",
                                    "csrf_token": csrf_of(form.text)})
        cookie = "; ".join(f"{k}={v}" for k, v in client.cookies.items())
    assert cookie
    status, _ = _refused_at_once(base_url, f"POST /dicomweb/studies HTTP/1.1\r\nHost: x\r\nCookie: {cookie}\r\n"
                                           "Content-Type: multipart/form-data; boundary=x\r\n"
                                           f"Content-Length: {GIB}\r\n\r\n")
    assert status in (401, 403)


def test_streaming_routes_still_take_large_bodies(lab, base_url):
    """The guard leaves STOW-RS to its own limits: a token's declared 1 GiB is judged by STOW (which
    waits for the body or refuses by its own rules), not refused as a form."""
    token = _token(lab, "site-a")
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall((f"POST /dicomweb/studies HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                      'Content-Type: multipart/related; type="application/dicom"; boundary=b\r\n'
                      "Content-Length: 1000\r\n\r\n").encode() + b"--b--\r\n".ljust(1000, b" "))
        sock.settimeout(30)
        head = sock.recv(65536)
    assert not head.startswith((b"HTTP/1.1 413", b"HTTP/1.1 411"))


BOMB = ("a: &a [x,x,x,x,x,x,x,x,x]\n"
        + "".join(f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]\n"
                  for p, c in zip("abcdefghijklmnopqrstuvwx", "bcdefghijklmnopqrstuvwxy"))
        + "sphere_kbq_ml: *y\n")


@pytest.mark.parametrize("text, said", [
    (BOMB, "anchor or alias"),
    ("kind: " + "[" * 50_000, "nested deeper"),
    ("sphere_kbq_ml: " + "9" * 5000, "cannot read"),
    ("kind: nema_iec\nreference_time: 2031-13-45T99:99:99\n", "cannot read"),
    ("kind: nema_iec\nhalf_life_s: -100\n", "positive"),
    ("kind: nema_iec\nsphere_kbq_ml: -5\n", "non-negative"),
])
def test_fill_sheet_bombs_and_impossible_values_are_refused_naming_the_fix(text, said):
    with pytest.raises(SheetMalformed) as caught:
        check_form(text.encode(), source="fill sheet for series 1.2.3")
    assert said in str(caught.value) and "fill sheet for series 1.2.3" in str(caught.value)


def test_a_site_posting_a_yaml_bomb_to_the_fill_sheet_form_gets_400(lab):
    from sqlmodel import select

    from corelab.db import session_scope
    from corelab.models import Series, Site
    app = create_app(lab.settings)
    client = client_for(app, "site-a")
    with session_scope(lab.settings) as s:
        series_id = s.exec(select(Series.id).join(Site, Series.site_id == Site.id)
                           .where(Site.code == "A01", Series.kind == "phantom")).first()
    assert series_id is not None
    page = client.get(f"/series/{series_id}")
    response = client.post(f"/series/{series_id}/fill-sheet",
                           data={"csrf_token": csrf_of(page.text), "text": BOMB})
    assert response.status_code == 400 and "anchor or alias" in response.text


def test_wildcard_matching_agrees_with_the_regular_expression_and_stays_linear():
    def by_regex(stored, wanted):
        pattern = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in wanted)
        return re.fullmatch(pattern, stored, flags=re.DOTALL) is not None

    rng = random.Random(7)
    for _ in range(20_000):
        stored = "".join(rng.choice("abc") for _ in range(rng.randint(0, 8)))
        wanted = "".join(rng.choice("abc*?") for _ in range(rng.randint(1, 6)))
        assert _text_match(stored, wanted) == by_regex(stored, wanted), (stored, wanted)
    assert not _text_match("A" * 64, "*A" * 31 + "Z")  # the regex takes years on this one


def test_searches_with_many_wildcards_or_repeating_group_tags_get_400():
    with pytest.raises(DicomwebError) as caught:
        parse_query([("PatientName", "*a" * (MAX_STARS + 1) + "Z")], "study")
    assert caught.value.status == 400 and "wildcards" in str(caught.value)
    assert parse_query([("PatientName", "**A***")], "study").header["PatientName"] == "*A*"
    for tag in ("60003000", "50000010"):
        with pytest.raises(DicomwebError) as caught:
            parse_query([("includefield", tag)], "study")
        assert caught.value.status == 400


def test_dicomweb_clients_get_json_for_numbers_too_long_to_be_ids(lab):
    client = client_for(create_app(lab.settings), None)
    for url in ("/dicomweb/studies/1234567890123456789012", "/dicomweb/studies?offset=0000000000000000001"):
        response = client.get(url, headers={"Accept": "application/dicom+json"})
        assert response.status_code == 404 and response.headers["content-type"].startswith("application/json")
        assert "19 digits" in response.json()["detail"]
