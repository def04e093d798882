"""A report as a list of blocks (headings, paragraphs, tables, figures), rendered to Markdown or to one
self-contained HTML file (figures embedded). Building the content and writing it out are kept apart so both
formats show exactly the same numbers."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from momkd.tables import Table, table_markdown


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Figure:
    """A PNG under the report folder (``path`` relative to it) with its caption."""

    path: str
    caption: str


Block = Heading | Paragraph | Table | Figure


def to_markdown(blocks: Sequence[Block]) -> str:
    parts = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append("#" * block.level + " " + block.text)
        elif isinstance(block, Paragraph):
            parts.append(block.text)
        elif isinstance(block, Table):
            parts.append(table_markdown(block))
        else:
            parts.append(f"![{block.caption}]({block.path})\n\n*{block.caption}*")
    return "\n\n".join(parts) + "\n"


_STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
          "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:3px 8px;"
          "font-size:0.9em}th{background:#eee}tfoot td{font-weight:bold}img{max-width:100%}"
          "figcaption{font-style:italic;font-size:0.9em}code{background:#f4f4f4}")


def to_html(blocks: Sequence[Block], title: str, folder: Path) -> str:
    """One HTML page with every figure embedded (base64 PNG): it can be mailed or archived on its own."""
    esc = html.escape
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
             f"<style>{_STYLE}</style></head><body>"]
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"<h{block.level}>{esc(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            parts.append(f"<p>{esc(block.text)}</p>")
        elif isinstance(block, Table):
            head = "".join(f"<th>{esc(c)}</th>" for c in block.header)
            body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in block.rows)
            foot = ("<tfoot><tr>" + "".join(f"<td>{esc(c)}</td>" for c in block.footer) + "</tr></tfoot>"
                    if block.footer is not None else "")
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody>{foot}</table>")
        else:
            data = base64.b64encode((folder / block.path).read_bytes()).decode("ascii")
            parts.append(f"<figure><img src='data:image/png;base64,{data}' alt='{esc(block.caption)}'>"
                         f"<figcaption>{esc(block.caption)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
