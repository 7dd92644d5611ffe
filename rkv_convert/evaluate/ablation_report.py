"""Markdown tables and the environment line of the accuracy ablation's results."""

from __future__ import annotations

import os
from typing import Iterable

import torch

from .variants import ABLATION_PROTOCOLS

__all__ = ["markdown_table", "selection_table", "env_summary"]


def markdown_table(rows: list[dict], text: str, bits_list: Iterable[int] = (2, 3, 4)) -> str:
    """One table per text: a row per variant, PPL (× FP) per bit width and protocol."""
    rows = [r for r in rows if r["text"] == text]
    if not rows:
        return ""
    bits_list = list(bits_list)
    first = rows[0]
    fp = next((r["ppl"] for r in rows if r["scheme"] == "fp"), None)
    cols = [(b, p) for b in bits_list for p in ABLATION_PROTOCOLS]
    head = "| variant | component | K/V bits/elem @2b |" + "".join(f" {b}b {p} |" for b, p in cols)
    lines = [
        f"**{text}**: {first['windows']} windows × {first['window_length']} tokens; full precision PPL "
        f"{fp:.3f}." if fp else f"**{text}**",
        "",
        head,
        "|" + "---|" * (3 + len(cols)),
    ]
    order: list[str] = []
    for r in rows:
        if r["variant"] not in order:
            order.append(r["variant"])
    for name in order:
        mine = [r for r in rows if r["variant"] == name]
        if mine[0]["scheme"] == "fp":
            lines.append(f"| {name} | baseline | 16 / 16 |" + f" {fp:.2f} |" + " |" * (len(cols) - 1))
            continue
        at2 = next((r for r in mine if r["bits"] == 2), mine[0])
        cells = []
        for b, p in cols:
            r = next((r for r in mine if r["bits"] == b and r["protocol"] == p), None)
            cells.append(f" {r['ppl']:.2f} ({r['ratio_fp']:.2f}×) |" if r else " – |")
        cell = name.replace("|", "\\|")  # markdown: a bare | would split the cell
        lines.append(f"| {cell} | {mine[0]['component']} | {at2['key_bits']:.2f} / {at2['value_bits']:.2f} |" + "".join(cells))
    return "\n".join(lines) + "\n"


def env_summary() -> dict:
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
    else:
        info["device"] = f"cpu ({os.cpu_count()} cores)"
    return info


def selection_table(trail: list[dict], chosen: dict) -> str:
    """The greedy selection, as markdown."""
    if not trail:
        return ""
    lines = ["**Selection** (2-bit, sinks protocol, development text; a value must gain > 0.5 % to replace the default)", "",
             "| option | value | given | dev PPL |", "|---|---|---|---|"]
    for t in trail:
        mark = " ✔" if chosen.get(t["option"], "unchanged") == t["value"] else ""
        lines.append(f"| {t['option']} | {t['value']!r}{mark} | {t['given'] or '-'} | {t['dev_ppl']:.3f} |")
    lines.append(f"\nchosen overrides: {chosen or 'none (defaults kept)'}")
    return "\n".join(lines) + "\n"
