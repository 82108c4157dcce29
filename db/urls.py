"""Connection URLs printed without their secrets, read the way their consumers read them.

SQLAlchemy takes a password up to the first ``@`` and lets it hold ``/``, ``?``, ``#`` and
``:``; Redis (redis-py) and kombu read a URL as urllib does: the authority ends at the first
``/``, ``?`` or ``#``. Whichever way, a password ends at an ``@`` and a host never holds one.
So a URL with credentials and an ``@`` left after them was split where its writer did not mean
(an unencoded ``@``, or a ``/`` the broker takes as the path): none of its text can be told
from the password, and it is shown as ``scheme://***`` and refused by the services (``check_url``).
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit

from db.exceptions import CxrError

SECRET_PARAMS = frozenset({"password", "passwd", "pwd", "secret", "token", "key", "sslpassword"})
MASK = "***"
UNPARSABLE = "(unparsable URL)"
AMBIGUOUS = "(credentials hidden: percent-encode @ / ? # ; in the password)"
KOMBU_SCHEMES = frozenset({"redis", "rediss", "sentinel", "redis+socket", "amqp", "amqps",
                           "pyamqp", "librabbitmq", "memory", "sqs"})
"""Broker URLs (read by kombu and redis-py); every other scheme is read as SQLAlchemy does."""
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")


def redacted_url(url: str) -> str:
    """``url`` with every secret hidden (the password, query parameters such as
    ``?password=``): the only form in which a URL is printed or logged. A URL that does not
    parse is not echoed at all, nor one whose credentials its consumer would split elsewhere."""
    if _scheme(url).lower() in KOMBU_SCHEMES:
        return _broker(url)
    return _database(url)


def check_url(url: str, variable: str) -> None:
    """Refuse a URL whose credentials cannot be read unambiguously: its consumer would send
    part of the password as a host or path, and log it there."""
    shown = redacted_url(url)
    if shown == UNPARSABLE:
        raise CxrError(f"{variable} cannot be parsed as a URL")
    if AMBIGUOUS in shown:
        raise CxrError(f"{variable} has an @, / or ; in its password that its reader takes "
                       "for the end of the password; percent-encode them (@ as %40, / as %2F)")


def _scheme(url: str) -> str:
    scheme = url.partition("://")[0]
    return scheme if "://" in url and _SCHEME.fullmatch(scheme) else ""


def _ambiguous(url: str, leftovers: str) -> bool:
    """An ``@`` after the credentials the parser took, while the text up to the last ``@``
    holds a ``:`` (so a password may be there)."""
    head = url.partition("://")[2].rpartition("@")[0]
    return "@" in leftovers and ":" in head


def _hidden(url: str) -> str:
    scheme = _scheme(url)
    return f"{scheme}://{MASK} {AMBIGUOUS}" if scheme else f"{MASK} {AMBIGUOUS}"


def _query(pairs: list[tuple[str, str]]) -> str:
    shown = urlencode([(k, MASK if k.lower() in SECRET_PARAMS else v) for k, v in pairs],
                      safe="*")
    return f"?{shown}" if shown else ""


def _database(url: str) -> str:
    """As SQLAlchemy's ``make_url`` reads it."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return UNPARSABLE
    pairs = [(k, v) for k, vs in parsed.query.items()
             for v in (vs if isinstance(vs, tuple) else (vs,))]
    leftovers = " ".join([parsed.host or "", parsed.database or "", *(k + v for k, v in pairs)])
    if _ambiguous(url, leftovers):
        return _hidden(url)
    bare = parsed.set(query={}).render_as_string(hide_password=True)
    return bare + _query(pairs)


def _broker(url: str) -> str:
    """As kombu reads it: alternatives joined by ``;``, each read like an HTTP URL."""
    pieces = url.split(";")
    if len(pieces) > 1 and not all(_scheme(p) for p in pieces):
        return _hidden(url)
    shown = [_broker_one(p) for p in pieces]
    if any(AMBIGUOUS in s for s in shown):
        return _hidden(url)
    return UNPARSABLE if UNPARSABLE in shown else ";".join(shown)


def _broker_one(url: str) -> str:
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises for a port that is not a number
    except ValueError:
        return UNPARSABLE
    userinfo, at, host = parts.netloc.rpartition("@")
    if _ambiguous(url, host + parts.path + parts.query + parts.fragment):
        return _hidden(url)
    user, colon, _password = userinfo.partition(":")
    credentials = f"{user}:{MASK}@" if colon else (f"{user}@" if at else "")
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    return f"{parts.scheme}://{credentials}{host}{parts.path}{_query(pairs)}"
