"""Review of session 14 (BLAKE3 hashes, migration 0017, bytecode in the Docker image).

Each test fails against the code under review; its docstring says why."""
from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mailsync.models import Email, EmailSource
from mailsync.storage import compress
from tests.factories import MailboxFactory

blake3_migration = importlib.import_module("mailsync.migrations.0017_blake3_hashes")
ROOT = Path(__file__).resolve().parents[2]

RAW = (b"Received: from mx.example.net by mx.example.com; Mon, 6 May 2024 10:00:00 +0000\r\n"
       b"Message-ID: <review14-1@client.example>\r\n"
       b"From: Client <client@client.example>\r\nTo: sales@example.com\r\n"
       b"Subject: Offer\r\nDate: Mon, 6 May 2024 10:00:00 +0000\r\n\r\nsee the offer\r\n")


def _prepared(raw: bytes):
    from mailsync.protocols.base import FetchedMessage
    from mailsync.sync.prepare import prepare

    return prepare(FetchedMessage(uid=1, flags=(), size=len(raw), internal_date=None, raw=raw))


@pytest.mark.django_db
@pytest.mark.parametrize("source_dir", ["unset", "not mounted"])
def test_0017_does_not_pass_over_every_pack_when_the_source_directory_is_misconfigured(
        settings, tmp_path, source_dir):
    """0017 swallows *every* error of reading a source (``_source``: ``except Exception``),
    including the configuration-level ones: MAILROOM_SOURCE_DIR unset (``path_of`` raises
    "MAILROOM_SOURCE_DIR is not set") or a directory that is not there at all (a volume not
    mounted in the one-off ``migrate`` container / shell). Then no pack-stored mail is
    rehashed, yet the migration completes and is recorded as applied: every such email keeps
    its SHA-256 fingerprint, so the sync (BLAKE3 now) stores each of them a second time when
    it is fetched again (a move to another folder, a UIDVALIDITY change, the Sent copy).
    Expected: the migration stops (raises) on such an error instead of completing."""
    settings.MAILROOM_SOURCE_DIR = tmp_path / "sources"
    from mailsync import sourcestore

    name, offsets = sourcestore.write_pack([compress(RAW)])
    p = _prepared(RAW)
    old = blake3_migration.hashes(RAW, p.envelope.message_id, p.fingerprint, new=False)
    email = Email.objects.create(mailbox=MailboxFactory(), fingerprint=old[1], content_hash=old[0],
                                 direction="received", message_id=p.envelope.message_id)
    EmailSource.objects.create(email=email, pack=name, offset=offsets[0],
                               length=len(compress(RAW)), size=len(RAW))
    if source_dir == "unset":
        settings.MAILROOM_SOURCE_DIR = None
    else:
        settings.MAILROOM_SOURCE_DIR = tmp_path / "elsewhere"  # the volume is not mounted

    from django.apps import apps

    with pytest.raises(Exception):  # noqa: B017,PT011
        blake3_migration.forwards(apps, None)
    # (were it to complete, the mail would now be unknown to the sync:)
    email.refresh_from_db()
    assert email.fingerprint != p.fingerprint


def _dockerfile_compiled_dirs() -> list[str]:
    text = (ROOT / "Dockerfile").read_text()
    line = re.search(r"python -m compileall(?: -\w+)*((?:\s+\\?\s*/\S+)+)", text)
    assert line, "the Dockerfile's compileall step"
    return [p for p in re.split(r"[\s\\]+", line.group(1)) if p]


def test_the_docker_image_has_bytecode_where_its_fetch_process_imports_from(tmp_path):
    """The Dockerfile's new ``compileall`` step compiles the copies in
    /usr/local/lib/python3.11/site-packages (which pip byte-compiles anyway, whatever
    PYTHONDONTWRITEBYTECODE says), but the image's processes do not import those: they run
    with WORKDIR /app, where ``COPY crm crm`` etc. left the source trees. ``python manage.py``
    puts /app first on sys.path, gunicorn inserts its chdir (the cwd), and ``celery -A crm``
    (``find_app``) imports ``crm`` from the cwd, which then stays first on sys.path, so
    ``mailsync`` comes from /app as well. The fetch process is then started with
    ``_PROJECT_ROOT`` = /app (cwd and PYTHONPATH), imports the uncompiled /app sources, and
    cannot cache bytecode (PYTHONDONTWRITEBYTECODE=1 is passed on to it; /app is root's, the
    processes run as ``mailroom``): the ~30 ms the step is meant to save are still spent.

    Reproduced here with the image's layout: ``app`` (WORKDIR, the COPY'd trees) and ``site``
    (the installed packages, compiled as the Dockerfile line says)."""
    app, site = tmp_path / "app", tmp_path / "site"
    ignore = shutil.ignore_patterns("__pycache__")
    for package in ("crm", "mailsync", "dropbox", "reports"):
        shutil.copytree(ROOT / package, app / package, ignore=ignore)
        shutil.copytree(ROOT / package, site / package, ignore=ignore)
    shutil.copy(ROOT / "manage.py", app / "manage.py")
    # The Dockerfile's compileall line, its paths mapped onto the two trees here
    where = {"/usr/local/lib/python3.11/site-packages/": site, "/app/": app}
    dirs = [str(base / d[len(prefix):]) for d in _dockerfile_compiled_dirs()
            for prefix, base in where.items() if d.startswith(prefix)]
    subprocess.run([sys.executable, "-m", "compileall", "-q", *dirs], check=True)

    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=str(site),
               DJANGO_SETTINGS_MODULE="crm.settings", DJANGO_SECRET_KEY="x", DJANGO_ALLOWED_HOSTS="x")
    # As the ``celery`` console script: sys.path[0] is its bin directory, then ``-A crm``.
    script = ("import sys; sys.path[0] = sys.argv[1]\n"
              "from celery.app.utils import find_app; find_app('crm')\n"
              "import mailsync.sync.fetcher as f; print(f._PROJECT_ROOT)\n")
    out = subprocess.run([sys.executable, "-c", script, str(Path(sys.executable).parent)],
                         cwd=app, env=env, capture_output=True, text=True, check=True)
    project_root = Path(out.stdout.strip().splitlines()[-1])
    # The fetch process imports from there (cwd and PYTHONPATH = _PROJECT_ROOT)
    tag = sys.implementation.cache_tag
    missing = [m for m in ("mailsync/sync/fetcher.py", "mailsync/sync/prepare.py",
                           "mailsync/mime/envelope.py", "mailsync/protocols/imap.py")
               if not (project_root / Path(m).parent / "__pycache__" / f"{Path(m).stem}.{tag}.pyc").exists()]
    assert not missing, f"the fetch process imports {project_root} and finds no bytecode for {missing}"
