"""What text people may set: one validator for every user-set text field, and a strict e-mail address check.

Any layer may import this module (it depends on ``errors`` only), so the lobby, the services and the API all refuse
the same characters with the same message.

*Printable* here means: every character is a Unicode letter, mark, number, punctuation or symbol, or the ASCII space.
Refused, because they can rewrite a terminal, hide or reorder text, or split a line in a log, a table or a header:

- C0 controls U+0000–U+001F (NUL, ESC, ``\\t``, ``\\r``, ``\\n``…), DEL U+007F and C1 controls U+0080–U+009F
  (``\\x85`` NEL, ``\\x9b`` CSI…): Unicode category ``Cc``;
- format characters (category ``Cf``): bidi embeddings, overrides and isolates U+202A–U+202E, U+2066–U+2069,
  the marks U+200E, U+200F, U+061C, zero-width space/joiners U+200B–U+200D, U+2060, U+FEFF, soft hyphen U+00AD…;
- line and paragraph separators U+2028, U+2029 (``Zl``, ``Zp``) and every space other than U+0020 (``Zs``: no-break,
  ideographic and other look-alike spaces);
- surrogates, private-use and unassigned code points (``Cs``, ``Co``, ``Cn``).

Error messages name the field and the first bad character by its code point (``U+001B``), never echo it raw.
"""

from __future__ import annotations

import re
import unicodedata

from ussycode.errors import UsageError

_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"})

# RFC 5322 dot-atom: the local part is ASCII atext in dot-separated runs (no quoted strings, comments or IP
# literals). Domain labels are checked after IDNA conversion to their ASCII (A-label) form.
_LOCAL_RE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
_LABEL_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
MAX_EMAIL = 254  # RFC 5321 path limit less the angle brackets
MAX_EMAIL_LOCAL = 64
MAX_EMAIL_DOMAIN = 253


def is_printable_char(ch: str) -> bool:
    """True for a character that :func:`printable_text` accepts."""
    return ch == " " or unicodedata.category(ch) not in _REFUSED_CATEGORIES


def first_unprintable(value: str) -> int | None:
    """The index of the first character :func:`printable_text` refuses, or None."""
    for i, ch in enumerate(value):
        if not is_printable_char(ch):
            return i
    return None


def describe_char(ch: str) -> str:
    """``U+001B`` (and the character's Unicode name when it has one): safe to print anywhere."""
    name = unicodedata.name(ch, "")
    return f"U+{ord(ch):04X}" + (f" ({name})" if name else "")


def printable_text(value: str, field: str, *, max_len: int, allow_empty: bool = True) -> str:
    """Return ``value`` when it is printable text of at most ``max_len`` characters; else raise :class:`UsageError`
    naming ``field`` (like ``"key comment"``) and what is wrong. The value is not stripped or changed."""
    if len(value) > max_len:
        raise UsageError(f"the {field} is too long ({len(value)} characters; at most {max_len})")
    if not value and not allow_empty:
        raise UsageError(f"the {field} is empty")
    bad = first_unprintable(value)
    if bad is not None:
        raise UsageError(f"the {field} may contain printable characters only; character {bad + 1} is "
                         f"{describe_char(value[bad])}")
    return value


def _domain_to_ascii(domain: str, field: str) -> str:
    labels = domain.rstrip(".").split(".") if domain else []
    if len(labels) < 2:
        raise UsageError(f"invalid {field}: the domain needs at least two labels, like example.org")
    out: list[str] = []
    for label in labels:
        try:
            # IDNA 2003 ToASCII (nameprep + punycode, 63-octet label limit), from the standard library.
            ascii_label = label.encode("idna").decode("ascii").lower()
        except UnicodeError:
            raise UsageError(f"invalid {field}: the domain label {label[:63]!r} is not a valid IDNA label") from None
        if not _LABEL_RE.fullmatch(ascii_label):
            raise UsageError(f"invalid {field}: domain labels are letters, digits and '-' (not at either end)")
        out.append(ascii_label)
    if out[-1].isdigit():
        raise UsageError(f"invalid {field}: the top-level domain cannot be all digits")
    result = ".".join(out)
    if len(result) > MAX_EMAIL_DOMAIN:
        raise UsageError(f"invalid {field}: the domain is longer than {MAX_EMAIL_DOMAIN} characters")
    return result


def email_address(value: str, field: str = "e-mail address") -> str:
    """A strict e-mail address check; returns the address with its domain in lower-case ASCII (IDNA A-labels).

    The local part is ASCII dot-atom text (letters, digits and ``!#$%&'*+/=?^_`{|}~-``, dots between runs), at most
    64 characters; the domain is an internationalised domain name of two or more labels, converted with IDNA; the
    whole address is at most 254 characters. Raises :class:`UsageError` naming ``field`` otherwise. Leading and
    trailing spaces are refused like any other stray character: the caller strips when it means to.
    """
    printable_text(value, field, max_len=MAX_EMAIL, allow_empty=False)
    local, sep, domain = value.rpartition("@")
    if not sep or not local:
        raise UsageError(f"invalid {field}: expected name@domain")
    if len(local) > MAX_EMAIL_LOCAL:
        raise UsageError(f"invalid {field}: the part before '@' is longer than {MAX_EMAIL_LOCAL} characters")
    if not _LOCAL_RE.fullmatch(local):
        raise UsageError(f"invalid {field}: the part before '@' may use ASCII letters, digits and "
                         "!#$%&'*+/=?^_`{|}~.- only (no spaces, quotes or a second '@', no leading, trailing or "
                         "double dots)")
    address = f"{local}@{_domain_to_ascii(domain, field)}"
    if len(address) > MAX_EMAIL:
        raise UsageError(f"invalid {field}: longer than {MAX_EMAIL} characters")
    return address
