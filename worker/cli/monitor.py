"""`cxr monitor`: each model version measured against the ground truth, and drift."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    pass
