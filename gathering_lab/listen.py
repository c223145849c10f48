"""Live tail of a server's events (placeholder, being written)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``listen`` command's arguments."""
    parser.add_argument("url", nargs="?", default="ws://127.0.0.1:8000/ws/dashboard")


async def run_cli(args: argparse.Namespace) -> int:
    """Run ``gathering-lab listen``."""
    raise NotImplementedError
