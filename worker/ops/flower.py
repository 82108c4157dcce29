"""Starting Celery Flower with the project's settings, keeping secrets off the command line.

Flower reads ``FLOWER_*`` environment variables as well as ``--options``. The broker URL and the
basic-auth password may both hold passwords, and a process's command line is readable by every
user on the machine (``ps``), so they travel through the environment instead: the broker URL as
``CXR_BROKER_URL`` (read by the Celery app) and the credentials as ``FLOWER_BASIC_AUTH``, which
this module's ``main`` sets from ``CXR_FLOWER_BASIC_AUTH`` in the child itself. That way a parent
that only runs ``flower_command(settings)`` still gets an authenticated Flower.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from collections.abc import Mapping
from typing import NoReturn

from db.exceptions import FlowerConfigError
from worker.settings import Settings

PURGE_OFFLINE_WORKERS_S = 300
"""Seconds after which Flower forgets a worker that went offline (restarts give new names)."""


def is_loopback(address: str) -> bool:
    """True when only this machine can reach ``address`` ('localhost' counts, '' means all)."""
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def check_flower_settings(settings: Settings) -> None:
    """Refuse an open Flower on a reachable address and credentials Flower would split wrongly.

    Flower can revoke and terminate tasks, so on anything but loopback it needs a password.
    It splits ``FLOWER_BASIC_AUTH`` on commas (several users), so a comma inside a password
    would silently become two bad credentials.
    """
    auth = settings.flower_basic_auth
    if not auth and not is_loopback(settings.flower_address):
        raise FlowerConfigError(
            f"Flower would listen on {settings.flower_address or 'all addresses'} without a "
            "password; set CXR_FLOWER_BASIC_AUTH=user:password (or CXR_FLOWER_ADDRESS=127.0.0.1)"
        )
    if auth:
        for credential in auth.split(","):
            user, sep, password = credential.partition(":")
            if not (user and sep and password):
                raise FlowerConfigError(
                    "CXR_FLOWER_BASIC_AUTH must be user:password (several joined by commas; "
                    "no commas inside a password)"
                )


def flower_command(settings: Settings) -> list[str]:
    """The argv that runs Flower for these settings; it holds no password.

    The child is this module run with ``python -m``: it reads the settings again from the
    environment and hands over to ``celery -A worker flower`` in the same process.
    """
    check_flower_settings(settings)
    return [
        sys.executable,
        "-m",
        "worker.ops.flower",
        f"--address={settings.flower_address}",
        f"--port={settings.flower_port}",
        "--persistent=False",
        f"--purge_offline_workers={PURGE_OFFLINE_WORKERS_S}",
    ]


def flower_env(settings: Settings, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for the Flower child: ``base`` (default ``os.environ``) plus these settings.

    Needed only when ``settings`` were built in code rather than read from the environment
    (tests, ``cxr demo``); the child otherwise reads the same ``CXR_*`` variables itself.
    """
    env = dict(os.environ if base is None else base)
    env["CXR_BROKER_URL"] = settings.broker_url
    if settings.flower_basic_auth:
        env["CXR_FLOWER_BASIC_AUTH"] = settings.flower_basic_auth
    else:
        env.pop("CXR_FLOWER_BASIC_AUTH", None)
        env.pop("FLOWER_BASIC_AUTH", None)
    return env


def exec_flower(settings: Settings) -> NoReturn:
    """Replace this process with Flower (``cxr flower`` runs in the foreground)."""
    argv = flower_command(settings)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, flower_env(settings))


def main(argv: list[str] | None = None) -> None:
    """Child entry point: move the credentials into Flower's own variable, then run Flower."""
    from celery.bin.celery import main as celery_main

    settings = Settings()
    check_flower_settings(settings)
    if settings.flower_basic_auth:
        os.environ["FLOWER_BASIC_AUTH"] = settings.flower_basic_auth
    sys.argv = ["celery", "-A", "worker", "flower", *(sys.argv[1:] if argv is None else argv)]
    sys.exit(celery_main())


if __name__ == "__main__":
    main()
