"""The built-in docs: Markdown files shipped with the package, rendered for a terminal (``doc``) or as HTML
(``https://<domain>/docs/``) with markdown-it-py. Raw HTML in the sources is not rendered (escaped)."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

from markdown_it import MarkdownIt
from markdown_it.token import Token

DIR = Path(__file__).parent
ORDER = ("getting-started", "vms", "sharing", "api", "agents", "email", "tokens", "limits")
MIN_WIDTH, MAX_WIDTH = 40, 120

_md = MarkdownIt("commonmark", {"html": False}).enable("table")


def topics() -> list[str]:
    found = {p.stem for p in DIR.glob("*.md")}
    return [t for t in ORDER if t in found] + sorted(found - set(ORDER))


def source(topic: str) -> str | None:
    if topic not in topics():
        return None
    return (DIR / f"{topic}.md").read_text(encoding="utf-8")


def title(topic: str) -> str:
    text = source(topic) or ""
    first = next((line for line in text.splitlines() if line.startswith("# ")), topic)
    return first.removeprefix("# ").strip()


def html(topic: str) -> str:
    rendered: str = _md.render(source(topic) or "")
    return rendered


def _inline(token: Token) -> str:
    out = []
    for child in token.children or []:
        if child.type in ("text", "html_inline"):
            out.append(child.content)
        elif child.type == "code_inline":
            out.append(child.content)
        elif child.type in ("softbreak", "hardbreak"):
            out.append(" ")
    return re.sub(r"\s+", " ", "".join(out)).strip()


def terminal(topic: str, width: int = 80) -> str:
    """The topic as plain text wrapped at ``width`` (clamped to 40-120): no colour, no escape sequences."""
    width = max(MIN_WIDTH, min(MAX_WIDTH, width))
    tokens = _md.parse(source(topic) or "")
    lines: list[str] = []
    bullet_depth = 0
    row: list[str] = []
    rows: list[list[str]] = []
    in_cell = False
    for i, tok in enumerate(tokens):
        if tok.type == "heading_open":
            text = _inline(tokens[i + 1])
            lines += ["", text.upper() if tok.tag == "h1" else text, "=" * min(len(text), width)
                      if tok.tag == "h1" else "-" * min(len(text), width)]
        elif tok.type == "bullet_list_open":
            bullet_depth += 1
        elif tok.type == "bullet_list_close":
            bullet_depth -= 1
        elif tok.type == "inline" and not in_cell and i > 0 and tokens[i - 1].type == "paragraph_open":
            indent = "  " * bullet_depth
            first = indent[:-2] + "- " if bullet_depth else ""
            lines += textwrap.wrap(_inline(tok), width, initial_indent=first or indent,
                                   subsequent_indent=indent) or [""]
            if not bullet_depth:
                lines.append("")
        elif tok.type in ("fence", "code_block"):
            lines += ["    " + line for line in tok.content.rstrip("\n").splitlines()] + [""]
        elif tok.type == "tr_open":
            row = []
        elif tok.type in ("th_open", "td_open"):
            in_cell = True
        elif tok.type == "inline" and in_cell:
            row.append(_inline(tok))
        elif tok.type in ("th_close", "td_close"):
            in_cell = False
        elif tok.type == "tr_close":
            rows.append(row)
        elif tok.type == "table_close":
            lines += _table(rows, width) + [""]
            rows = []
    text = "\n".join(lines).strip("\n")
    return re.sub(r"\n{3,}", "\n\n", text) + "\n"


def _table(rows: list[list[str]], width: int) -> list[str]:
    """Each row as ``first cell: other cells`` wrapped to the width (tables wider than a terminal stay readable)."""
    if not rows:
        return []
    header, body = rows[0], rows[1:]
    out = []
    for cells in body:
        if len(header) == 2:
            parts = [c for c in cells[1:] if c]
        else:
            parts = [f"{h}: {c}" for h, c in zip(header[1:], cells[1:], strict=False) if c]
        out += textwrap.wrap(f"{cells[0]} — " + "; ".join(parts) if parts else cells[0], width,
                             initial_indent="  ", subsequent_indent="      ")
    return out
