"""Pure MIME parsing for mail sync: bytes in, frozen dataclasses out. No Django here."""
from mailsync.mime.envelope import Envelope, content_hash, derived_message_key, parse_envelope, wire_form
from mailsync.mime.headers import Address, normalize_message_id
from mailsync.mime.message import Attachment, ParsedMessage, parse_message
from mailsync.mime.sanitize import SanitizedHtml, html_to_text, sanitize_html

__all__ = [
    "Address",
    "Attachment",
    "Envelope",
    "ParsedMessage",
    "SanitizedHtml",
    "content_hash",
    "derived_message_key",
    "html_to_text",
    "normalize_message_id",
    "parse_envelope",
    "parse_message",
    "sanitize_html",
    "wire_form",
]
