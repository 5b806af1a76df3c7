"""The shared corpus of real-world and broken mail, read in place (never copied).

It sits beside the repository (``../shared/corpus``), where CI puts it too;
MAILROOM_CORPUS_DIR overrides the location. A missing corpus fails the tests that need it:
skipping would hide that they proved nothing.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CORPUS = Path(os.environ.get("MAILROOM_CORPUS_DIR") or REPO_ROOT.parent / "shared" / "corpus")


def corpus_files() -> list[Path]:
    if not CORPUS.is_dir():
        pytest.fail(f"No mail corpus at {CORPUS}: set MAILROOM_CORPUS_DIR.", pytrace=False)
    return sorted(p for p in CORPUS.rglob("*") if p.is_file() and p.suffix.lower() in (".eml", ".msg"))
