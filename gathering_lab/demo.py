"""Realistic GatheRing traffic for demos and load (placeholder, being written)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``demo`` command's arguments."""
    parser.add_argument("--url", default="ws://127.0.0.1:8000/ws/dashboard")


async def run_cli(args: argparse.Namespace) -> int:
    """Run ``gathering-lab demo``."""
    raise NotImplementedError
