"""Bytes -> str for declared charsets that may be wrong, unknown or hostile. Never raises."""
from __future__ import annotations

import codecs
import functools
import re

# Labels that mail software writes but Python does not know, or knows as something narrower.
# The WHATWG Encoding Standard (what browsers do) treats latin-1 labels as windows-1252, which is
# what Outlook really sends under "iso-8859-1"; us-ascii is left to the UTF-8-first fallback below.
_ALIASES: dict[str, str | None] = {
    "us-ascii": None,
    "ascii": None,
    "ansi_x3.4-1968": None,
    "iso-8859-1": "cp1252",
    "iso8859-1": "cp1252",
    "iso_8859-1": "cp1252",
    "latin1": "cp1252",
    "latin-1": "cp1252",
    "l1": "cp1252",
    "ks_c_5601-1987": "cp949",
    "ks_c_5601": "cp949",
    "ks_c_5601-1989": "cp949",
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "x-gbk": "gb18030",
    "iso-8859-8-i": "iso-8859-8",
    "iso-8859-8-e": "iso-8859-8",
    "iso-8859-6-i": "iso-8859-6",
    "iso-8859-6-e": "iso-8859-6",
    "x-sjis": "shift_jis",
    "windows-874": "cp874",
    "x-mac-roman": "mac-roman",
    "macintosh": "mac-roman",
    "unicode-1-1-utf-7": "utf-7",
    "utf8": "utf-8",
    "unknown-8bit": None,
    "x-unknown": None,
    "unknown": None,
    "default": None,
    "x-user-defined": None,
}

# Text codecs Python has but that no mail should select: they interpret escapes or raise always.
_REFUSED = frozenset(
    {"unicode-escape", "raw-unicode-escape", "idna", "punycode", "undefined", "unicode-internal"}
)
_LABEL_RE = re.compile(r"^[A-Za-z0-9._:+-]{1,40}$")
_SURROGATE_RE = re.compile("[\ud800-\udfff]")


@functools.lru_cache(maxsize=512)
def resolve_charset(label: str | None) -> str | None:
    """Return a Python text codec name for a MIME charset label, or None if unusable."""
    if not label:
        return None
    # RFC 2045 §5.1 allows a comment after the value: charset="us-ascii" (7bit).
    label = label.split("(", 1)[0].strip().strip("\"'").lower()
    if not _LABEL_RE.match(label):
        return None
    if label in _ALIASES:
        return _ALIASES[label]
    try:
        info = codecs.lookup(label)
    except (LookupError, ValueError, TypeError):
        return None
    if not getattr(info, "_is_text_encoding", True) or info.name.replace("_", "-") in _REFUSED:
        return None
    return info.name


def scrub(text: str) -> str:
    """Replace lone surrogates (utf-7/utf-16 can yield them) that PostgreSQL and UTF-8 reject."""
    if text.isascii() or not _SURROGATE_RE.search(text):
        return text
    return _SURROGATE_RE.sub("\ufffd", text)


def mostly_utf8(data: bytes) -> str | None:
    """UTF-8 with errors replaced, if at most 1 in 10 non-ASCII characters is broken.

    Catches UTF-8 cut mid-character (clients truncating long names) without mistaking
    windows-1252 text, which is almost never valid UTF-8, for it.
    """
    text = data.decode("utf-8", "replace")
    bad = text.count("\ufffd")
    non_ascii = sum(1 for ch in text if ch > "\x7f")
    return text if bad * 10 <= non_ascii else None


def decode_bytes(data: bytes, charset: str | None) -> tuple[str, str | None]:
    """Decode with the declared charset, else UTF-8, else cp1252 replacing errors.

    Returns (text, defect-or-None). RFC 2045 §5.2 makes us-ascii the default charset; real mail
    that omits or mislabels it is mostly UTF-8 (RFC 6532) or windows-1252, so those are tried next.
    """
    codec = resolve_charset(charset)
    try:
        if codec is not None:
            try:
                return scrub(data.decode(codec)), None
            except (UnicodeDecodeError, LookupError, ValueError):
                pass
            if codec != "utf-8" and not data.isascii():
                # (7-bit data such as ISO-2022-JP is always "valid UTF-8": its own codec,
                # with the odd character replaced, is the better reading.)
                try:
                    return data.decode("utf-8"), f"text not valid {codec}; decoded as UTF-8"
                except UnicodeDecodeError:
                    pass
            if codec == "utf-8":
                # Labelled UTF-8 but with more invalid bytes than valid non-ASCII characters:
                # windows-1252 sent with the wrong label.
                text = data.decode("utf-8", "replace")
                bad = text.count("\ufffd")
                if bad > sum(1 for ch in text if ch > "\x7f") - bad:
                    return data.decode("cp1252", "replace"), "text not valid UTF-8; decoded as cp1252"
            return scrub(data.decode(codec, "replace")), f"invalid {codec} bytes replaced"
        note = None
        if charset and charset.strip().strip("\"'").lower() not in _ALIASES:
            note = f"unknown charset {charset.strip()[:40]!r}"
        try:
            return data.decode("utf-8"), note
        except UnicodeDecodeError:
            pass
        text = mostly_utf8(data)
        if text is not None:
            return text, note or "invalid UTF-8 bytes replaced"
        return data.decode("cp1252", "replace"), note or "8-bit text without charset; cp1252"
    except Exception:  # a codec with a bug must not take the message down
        return data.decode("latin-1"), "charset decoding failed; decoded as latin-1"
