"""The built-in docs: every topic renders for a terminal at any width (no line over it but code, no escapes) and
as HTML with raw HTML escaped."""

from __future__ import annotations

import pytest

from ussycode import docs

TOPICS = ("getting-started", "vms", "sharing", "api", "agents", "email", "tokens", "limits")


def test_the_promised_topics_ship() -> None:
    assert tuple(docs.topics()[:len(TOPICS)]) == TOPICS
    assert all(docs.title(t) and docs.title(t) != t for t in TOPICS)


@pytest.mark.parametrize("width", [40, 60, 80, 100, 120, 10, 500])
@pytest.mark.parametrize("topic", TOPICS)
def test_terminal_rendering_respects_the_width(topic: str, width: int) -> None:
    text = docs.terminal(topic, width)
    limit = max(40, min(120, width))
    assert text.strip() and "\x1b" not in text
    for line in text.splitlines():
        if not line.startswith("    "):  # code blocks keep their lines
            assert len(line) <= limit, (topic, width, line)
    assert docs.title(topic).upper() in text


def test_html_escapes_raw_html() -> None:
    assert "<script" not in docs._md.render("<script>alert(1)</script> **x**")  # noqa: SLF001
    page = docs.html("sharing")
    assert page.startswith("<h1>Sharing</h1>") and "<table>" in page and "&lt;vm&gt;" in page
