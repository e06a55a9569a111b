"""The one printable-text validator and the strict e-mail address check."""

from __future__ import annotations

import pytest

from ussycode.errors import UsageError
from ussycode.validate import describe_char, email_address, first_unprintable, printable_text

HOSTILE = [
    "\x00", "\x1b[2J", "\x1b]0;pwned\x07", "\t", "\r", "\n", "\x7f", "\x85", "\x9b31m", "\u202e", "\u202a",
    "\u2066", "\u2069", "\u200b", "\u200d", "\u200e", "\u2060", "\ufeff", "\u2028", "\u2029", "\u00a0", "\u3000",
    "\u00ad", "\ue000", "\U0010ffff", "\ud800",
]


@pytest.mark.parametrize("text", ["work laptop", "alice@example.org", "Ünïcødé ok", "日本語", "emoji 🎉",
                                  "punct !\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~", "", "e\u0301"])
def test_printable_text_accepts(text: str) -> None:
    assert printable_text(text, "comment", max_len=200) == text
    assert first_unprintable(text) is None


@pytest.mark.parametrize("bad", HOSTILE)
def test_printable_text_refuses_controls_bidi_and_separators(bad: str) -> None:
    value = f"nice{bad}text"
    assert first_unprintable(value) == 4
    with pytest.raises(UsageError) as exc:
        printable_text(value, "key comment", max_len=200)
    message = exc.value.user_message
    assert message.startswith("the key comment may contain printable characters only")
    assert f"U+{ord(bad[0]):04X}" in message and "character 5" in message
    assert all(ch == " " or ch.isprintable() for ch in message)  # the bad character is never echoed raw


def test_printable_text_length_and_empty() -> None:
    with pytest.raises(UsageError, match=r"the tag is too long \(10240 characters; at most 40\)"):
        printable_text("a" * 10240, "tag", max_len=40)
    with pytest.raises(UsageError, match="the name is empty"):
        printable_text("", "name", max_len=5, allow_empty=False)


def test_describe_char() -> None:
    assert describe_char("\u202e") == "U+202E (RIGHT-TO-LEFT OVERRIDE)"
    assert describe_char("\x1b") == "U+001B"


@pytest.mark.parametrize(("given", "normal"), [
    ("alice@example.org", "alice@example.org"),
    ("Alice.B+tag@Example.ORG", "Alice.B+tag@example.org"),
    ("o'brien@mail.example.co.uk", "o'brien@mail.example.co.uk"),
    ("x@bücher.example", "x@xn--bcher-kva.example"),
    ("x@例え.テスト", "x@xn--r8jz45g.xn--zckzah"),
    ("a@b.c.", "a@b.c"),
    ("l" * 64 + "@example.org", "l" * 64 + "@example.org"),
])
def test_email_accepts_and_normalises(given: str, normal: str) -> None:
    assert email_address(given) == normal


@pytest.mark.parametrize("bad", [
    "", "alice", "@example.org", "alice@", "alice@localhost", "alice@@example.org", "a@b@example.org",
    "al ice@example.org", " alice@example.org", "alice@example.org ", '"alice"@example.org', ".alice@example.org",
    "alice.@example.org", "al..ice@example.org", "ålice@example.org", "alice@exa mple.org", "alice@-x.org",
    "alice@x-.org", "alice@x..org", "alice@x_y.org", "alice@[127.0.0.1]", "alice@1.2.3.4", "alice@x/y.org",
    "alice(comment)@example.org", "l" * 65 + "@example.org", "a@" + "b" * 64 + ".org",
    "a@" + ".".join(["b" * 60] * 5) + ".org", "alice\r\n@example.org", "alice@example.org\x00",
    "alice@example.org\u202e", "alice\x1b[2J@example.org", "alice\x85@example.org", "a" * 10240 + "@example.org",
    "alice@exam\u200bple.org",
])
def test_email_refuses(bad: str) -> None:
    with pytest.raises(UsageError) as exc:
        email_address(bad)
    assert "e-mail address" in exc.value.user_message


def test_email_names_the_field() -> None:
    with pytest.raises(UsageError, match="invalid share target"):
        email_address("x@y", field="share target")
