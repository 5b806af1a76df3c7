"""Attachment file names that are safe to show, store and put in Content-Disposition."""
from __future__ import annotations

import mimetypes
import re
import unicodedata

MAX_FILENAME_CHARS = 255  # the common file-system limit for one path component

# Deterministic: mimetypes.MimeTypes() uses Python's built-in table, not the host's mime.types.
_MIMETYPES = mimetypes.MimeTypes()
_EXTENSIONS = {
    "text/plain": ".txt",
    "text/html": ".html",
    "text/calendar": ".ics",
    "text/rfc822-headers": ".txt",
    "message/rfc822": ".eml",
    "message/global": ".eml",
    "message/delivery-status": ".txt",
    "message/disposition-notification": ".txt",
    "image/jpeg": ".jpg",
    "image/png": ".png",
    "image/gif": ".gif",
    "application/pdf": ".pdf",
    "application/pgp-signature": ".asc",
    "application/pkcs7-signature": ".p7s",
    "application/octet-stream": ".bin",
}
# Reserved on Windows; '"' and '\\' would also break a quoted Content-Disposition filename.
_RESERVED_RE = re.compile(r'[<>:"|?*\\/]')


def extension_for(content_type: str) -> str:
    """A file extension for a media type ('' if none is known)."""
    ext = _EXTENSIONS.get(content_type)
    if ext is None:
        try:
            ext = _MIMETYPES.guess_extension(content_type) or ""
        except Exception:
            ext = ""
    return ext


def safe_filename(name: str | None, content_type: str = "application/octet-stream") -> str:
    """Strip path parts, control/format characters (NUL, CR/LF, bidi overrides like U+202E),
    Windows-reserved characters and leading/trailing dots; cap at 255 chars; never empty."""
    text = unicodedata.normalize("NFC", name or "")
    # Keep only the last path component: "../../etc/passwd" -> "passwd", "C:\\x\\y.exe" -> "y.exe".
    text = re.split(r"[/\\]", text)[-1]
    # Category C: Cc (controls, NUL, CR, LF), Cf (bidi overrides, zero-width), Cs, Co, Cn.
    text = "".join(ch for ch in text if unicodedata.category(ch)[0] != "C")
    text = _RESERVED_RE.sub("_", text)
    text = " ".join(text.split()).strip(" .")
    if not text:
        return "attachment" + extension_for(content_type)
    if len(text) > MAX_FILENAME_CHARS:
        stem, dot, ext = text.rpartition(".")
        if dot and stem and 0 < len(ext) <= 16:
            text = stem[: MAX_FILENAME_CHARS - len(ext) - 1].rstrip(" .") + "." + ext
        else:
            text = text[:MAX_FILENAME_CHARS].rstrip(" .")
    return text
