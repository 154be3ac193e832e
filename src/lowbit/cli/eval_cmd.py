"""`lowbit eval` (being built)."""

from __future__ import annotations

import argparse

from ..errors import LowbitError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="(not available yet)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    raise LowbitError("'lowbit eval' is not available in this version")
