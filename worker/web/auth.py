"""Who may use the review app: hashed passwords from a setting, or a reverse proxy's header;
the session key; CSRF tokens.

Passwords are hashed with the standard library's scrypt (memory-hard, salted per user), so
``CXR_WEB_USERS`` can sit in a compose file without handing out the passwords. Like Flower, the
app refuses to listen beyond loopback when neither users nor a trusted header are configured.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from contextlib import suppress
from pathlib import Path

from db.exceptions import CxrError
from worker.ops.flower import is_loopback
from worker.settings import Settings

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
"""scrypt cost (16 MiB per check): a guess costs an attacker the same memory."""
SECRET_FILE = "web-secret"
LOCAL_USER = "local"
"""Who labels when the app is on loopback without users: anyone who can reach this machine."""


class WebConfigError(CxrError):
    """The review app's settings would leave it open or cannot be read."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str, salt: bytes | None = None) -> str:
    """``scrypt$N$r$p$salt$hash``: what ``cxr web hash-password`` prints for CXR_WEB_USERS."""
    if not password:
        raise WebConfigError("an empty password cannot be hashed")
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                            dklen=32)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, encoded: str) -> bool:
    """Whether ``password`` matches ``encoded`` (constant-time; a malformed hash never does)."""
    try:
        kind, n, r, p, salt, digest = encoded.split("$")
        if kind != "scrypt" or int(n) > 2**20:
            return False
        got = hashlib.scrypt(password.encode(), salt=_unb64(salt), n=int(n), r=int(r),
                             p=int(p), dklen=len(_unb64(digest)), maxmem=1 << 30)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, _unb64(digest))


def parse_users(text: str | None) -> dict[str, str]:
    """``name:hash,...`` as name -> hash; a plain password instead of a hash is refused."""
    users: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        name, sep, encoded = item.partition(":")
        if not (name and sep and encoded.startswith("scrypt$") and encoded.count("$") == 5):
            raise WebConfigError("CXR_WEB_USERS must be name:hash,... with hashes made by "
                                 "`cxr web hash-password` (never a plain password)")
        users[name] = encoded
    return users


def check_web_settings(settings: Settings) -> None:
    """Refuse an app reachable beyond this machine that anyone could use, and bad users."""
    users = parse_users(settings.web_users)
    if not users and not settings.web_trusted_header and not is_loopback(settings.web_address):
        raise WebConfigError(
            f"the review app would listen on {settings.web_address or 'all addresses'} without "
            "sign-in; set CXR_WEB_USERS=name:hash (`cxr web hash-password`) or "
            "CXR_WEB_TRUSTED_HEADER behind a proxy (or CXR_WEB_ADDRESS=127.0.0.1)")


def session_secret(settings: Settings) -> str:
    """CXR_WEB_SECRET, or a random key kept in the data dir (made once, mode 600)."""
    if settings.web_secret:
        return settings.web_secret
    path = Path(settings.data_dir).absolute() / SECRET_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with suppress(FileExistsError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(48))
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd) as fh:
        if os.fstat(fh.fileno()).st_mode & 0o077:
            raise WebConfigError(f"{path} is readable by other users; chmod 600 it")
        secret = fh.read().strip()
    if len(secret) < 32:
        raise WebConfigError(f"{path} holds no usable key; delete it to make a new one")
    return secret


def new_csrf_token() -> str:
    return secrets.token_urlsafe(32)


def csrf_matches(expected: str | None, given: str | None) -> bool:
    return bool(expected and given) and hmac.compare_digest(str(expected), str(given))
