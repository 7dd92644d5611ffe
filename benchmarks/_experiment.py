"""Command-line arguments shared by the accuracy experiments (``exp_*.py``): a folded checkpoint scored on
windows of an evaluation text in some protocols, rows appended to a CSV."""

from __future__ import annotations

import argparse
from pathlib import Path


def experiment_parser(description: str) -> argparse.ArgumentParser:
    """A parser with the arguments every experiment takes; each script adds its own after them."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--text", type=Path, required=True, help="evaluation text (never calibration text)")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--protocols", default="oneshot,deployed")
    p.add_argument("--csv", type=Path, default=None)
    return p
