"""The fast path for simple address lists answers exactly what the stdlib's getaddresses does,
and gives up (None) on anything it does not know, so the stdlib parser takes it.

Compared on every address header of the shared corpus and on lists generated from pieces
chosen to sit on the edges of the fast path (dots and specials in names, quotes, comments,
groups, tabs, non-ASCII, domain literals, stray commas...)."""
from __future__ import annotations

import random
import time
from email.utils import getaddresses

import pytest

from mailsync.mime.headers import _fast_getaddresses, parse_addresses, split_header_block

from tests.corpus import corpus_files

def _stdlib(value: str) -> list[tuple[str, str]]:
    # As parse_addresses calls it: strict where this Python has the strict mode (3.13,
    # 3.12.6+, 3.11.10+), lax before. ('', '') pairs are dropped by parse_addresses.
    return [pair for pair in getaddresses([value]) if pair != ("", "")]


NAMES = ["John Smith", "Jörg  Müller", "=?utf-8?q?J=C3=B6rg?=", "=?utf-8?b?SsO2cmc=?=", "O'Brien",
         "Dr. Who", "a.b", '"Smith, John"', '"Smith, John" Jr', '"a\\"b"', '"x@y"', '""',
         "Joe (the boss)", "Joe\tTab", "Joe\u00a0Nbsp", "Ann <", "[x]", "a;b", "Ünïcode Näme",
         "x:y", " lead", "trail ", "", "=?utf-8?q?Dr.=20X?=", '"quoted\twith tab"', "a@b"]
ADDRESSES = ["a@b.example", "A.B@X.EXAMPLE", "o'neil@x.example", "x+tag@mail.example",
             "weird..dots@x.example", ".lead@x.example", "trail.@x.example", "a@[127.0.0.1]",
             "a@b", "a@-b.example", '"q l"@x.example', "ü@x.example", "a@ü.example",
             "@x.example", "a@", "no-at", "a@@b", "a@b.example (comment)", "<a@b.example>",
             "@route,@x:a@b.example", "a@b .example"]
SEPARATORS = [", ", ",", " , ", ",,", ";", ",\t", " ", ", ,"]


def _entry(rng: random.Random) -> str:
    address = rng.choice(ADDRESSES)
    shape = rng.randrange(5)
    if shape == 0:
        return address
    if shape == 1:
        return f"<{address}>"
    name = rng.choice(NAMES)
    if shape == 2:
        return f"{name} <{address}>"
    if shape == 3:
        return f"{name}<{address}>"
    return f"Group: {name} <{address}>;"


def _lists(count: int) -> list[str]:
    rng = random.Random(20261127)
    out = []
    for _ in range(count):
        entries = [_entry(rng) for _ in range(rng.randrange(1, 4))]
        value = entries[0]
        for entry in entries[1:]:
            value += rng.choice(SEPARATORS) + entry
        if rng.random() < 0.1:
            value = rng.choice([" ", "\t", ",", ", "]) + value + rng.choice(["", " ", ",", " ,"])
        out.append(value)
    return out


def test_generated_lists_match_the_stdlib_where_the_fast_path_answers():
    answered = 0
    for value in _lists(20_000):
        fast = _fast_getaddresses(value)
        if fast is not None:
            answered += 1
            assert fast == _stdlib(value), value
    # The fast path must take the common shapes, or it is no faster.
    assert answered > 1_000


@pytest.mark.parametrize("value,expected", [
    ("John Smith <j@x.example>", [("John Smith", "j@x.example")]),
    ('"Smith, John" <j@x.example>, a@b.example', [("Smith, John", "j@x.example"), ("", "a@b.example")]),
    ("Jörg  Müller <a@b.example>", [("Jörg Müller", "a@b.example")]),
    ("<a@b.example>", [("", "a@b.example")]),
])
def test_common_shapes_take_the_fast_path(value, expected):
    assert _fast_getaddresses(value) == expected == _stdlib(value)


@pytest.mark.parametrize("value", [
    "Dr. Who <a@b.example>", "a@b.example (Joe)", "Group: a@b.example;", '"a\\"b" <a@b.example>',
    "a@[127.0.0.1]", "Joe\u00a0Nbsp <a@b.example>", "<a@b.example> trailing", "a@b.example x",
    # empty entries: strict getaddresses drops the whole list, lax skips them; its call
    "a@b.example, c@d.example,", ",, a@b.example", "a@b.example,,c@d.example",
])
def test_anything_else_goes_to_the_stdlib(value):
    assert _fast_getaddresses(value) is None


def test_every_address_header_of_the_corpus_matches_the_stdlib():
    seen = 0
    for path in corpus_files():  # fails (not skips) when the corpus is missing
        block = split_header_block(path.read_bytes())
        for name in ("from", "sender", "reply-to", "to", "cc", "bcc"):
            for value in block.texts(name):
                seen += 1
                fast = _fast_getaddresses(value)
                if fast is not None:
                    assert fast == _stdlib(value), (path.name, value)
                # and the whole pipeline still parses it
                parse_addresses([value])
    assert seen > 50


@pytest.mark.parametrize("value", [
    " " * 60_000 + "x", "\t" * 60_000 + "(", "a@b.example," + " " * 60_000 + "x",
    "John" + " " * 60_000 + "x", "a@b.example" + " " * 60_000 + "x", "a " * 30_000 + "x",
    "<" + "a." * 30_000 + "@b>", "a@" + "b." * 30_000 + " x", '"' + " " * 60_000,
])
def test_hostile_lists_cost_linear_time(value):
    """Found in review: blanks before a miss made the first version backtrack O(n^2), 31 s
    for one 60,000-blank To header. A header this long must cost milliseconds, not seconds
    (the bound is loose on purpose: it guards the complexity, not the speed)."""
    start = time.process_time()
    _fast_getaddresses(value)
    parse_addresses([value])
    assert time.process_time() - start < 1.0
