"""Sending mail from the CRM: compose, deliver over SMTP, retry.

``email_send`` stores the message on the record at once (send state "sending") and queues
``mailsync.send_email``, which calls ``email_deliver``: SMTP through the mailbox's server,
then "sent" (and, for IMAP, a copy APPENDed to the Sent folder, which the next sync of that
folder recognises by fingerprint instead of storing twice) or "failed" with what to fix.

A message is sent at most once: the task is acknowledged on receipt, ``email_deliver``
only acts on mail in state "sending", and only while it holds the mail's send claim
(``sync.lock.send_claim``: one delivery of a mail at a time). A worker killed mid-send leaves the mail in "sending";
after ``STALE_SENDING`` the user may retry it (a duplicate to a customer is worse than a
visible, retryable state).
"""
from __future__ import annotations

import base64
import hashlib
import logging
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from email import policy as email_policy
from email.header import Header
from email.headerregistry import Address as HeaderAddress
from email.message import EmailMessage
from email.utils import format_datetime, getaddresses

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import validate_email
from django.db import IntegrityError, transaction
from django.utils import timezone

from crm.exceptions import RecordPermissionDenied
from crm.models import Contact, Deal, Lead, User
from crm.selectors import records_visible_to

from .association import emails_associate
from .exceptions import MailConfigError, MailDeliveryUncertain, MailError, SourceStoreError
from .mime import html_to_text, sanitize_html
from .mime.filenames import safe_filename
from .models import Attachment, AttachmentBlob, Email, EmailLink, EmailSource, Mailbox
from .protocols import smtp
from .protocols.base import FetchedMessage, ServerSettings
from .storage import compress, decompress
from .sync.base import login_password
from .sync.copy import read_source, write_blobs, write_sources
from .sync.ingest import _participants, assign_threads, prepare, shareable

log = logging.getLogger(__name__)

# Most providers cap a message at 25 MB; base64 makes attachments a third larger on the wire.
MAX_ATTACHMENTS_BYTES = 18 * 1024 * 1024
MAX_RECIPIENTS = 100
# References kept on a reply: the root plus the latest ones (RFC 5322 3.6.4 trimming).
MAX_REFERENCES = 20
# A mail still "sending" after this long lost its worker: the user may send it again.
STALE_SENDING = timedelta(minutes=15)
SMTP_TIMEOUT = 60.0
# email_send's token: the compose form's (generated, short) or the API's Idempotency-Key
# header, which errors about it name.
MAX_TOKEN_LENGTH = 100
TOKEN_FIELD = "Idempotency-Key"

# CR, LF and NUL (header injection), and what else the email package takes for a line end
# (str.splitlines: VT, FF, FS, GS, RS, NEL, U+2028, U+2029) or RFC 5322 forbids in a header
# (other controls but TAB, DEL): the email package raised ValueError on the former while
# building the mail, a 500 instead of a 400 naming the field; the latter went out raw.
_UNSAFE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\x85\u2028\u2029]")
_NAMED = re.compile(r'^\s*(?:"((?:[^"\\]|\\.)*)"|([^"<>]*?))\s*<([^<>\s]+)>\s*$')
RecordType = Lead | Contact | Deal


@dataclass(frozen=True)
class OutgoingAttachment:
    filename: str
    content_type: str
    data: bytes


# -- addresses -------------------------------------------------------------------------------

def _split_list(value: str) -> list[str]:
    """Split "a@x, \"Doe, J\" <j@y>; k@z" at top-level commas and semicolons."""
    parts, current, quoted, angle = [], [], False, False
    escaped = False
    for ch in value:
        if escaped:
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"' and not angle:
            quoted = not quoted
        elif ch == "<" and not quoted:
            angle = True
        elif ch == ">" and not quoted:
            angle = False
        elif ch in ",;" and not quoted and not angle:
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def parse_address_list(value: str | Iterable[str], *, field: str) -> list[HeaderAddress]:
    """Addresses typed by a user ("a@x, Name <b@y>") -> header addresses, or a
    ValidationError for ``field``. Line breaks are refused outright (header injection)."""
    items = [value] if isinstance(value, str) else list(value)
    out: list[HeaderAddress] = []
    for item in items:
        if not isinstance(item, str):
            raise ValidationError({field: ["Addresses must be text."]})
        if _UNSAFE.search(item):
            raise ValidationError({field: ["Line breaks and control characters are not allowed in addresses."]})
        for piece in _split_list(item):
            match = _NAMED.match(piece)
            name, addr = ((match.group(1) or match.group(2) or "").strip(), match.group(3)) \
                if match else ("", piece)
            try:
                validate_email(addr)
                out.append(HeaderAddress(display_name=name.replace('\\"', '"'), addr_spec=_ascii_domain(addr)))
            except (ValidationError, ValueError, IndexError, UnicodeError) as exc:
                raise ValidationError({field: [f"{piece!r} is not a valid email address."]}) from exc
    if len(out) > MAX_RECIPIENTS:
        raise ValidationError({field: [f"At most {MAX_RECIPIENTS} addresses."]})
    return out


def _ascii_domain(address: str) -> str:
    """An internationalized domain in its ASCII form (IDNA, RFC 5891): the only form a header
    and RCPT TO carry without SMTPUTF8 (``policy.SMTP`` would put an encoded word in the
    domain, which no mail client reads as an address)."""
    local, _, domain = address.rpartition("@")
    if domain.isascii():
        return address
    return f"{local}@{domain.encode('idna').decode('ascii')}"


def _single_address(value: str, *, field: str) -> HeaderAddress:
    found = parse_address_list(value, field=field)
    if len(found) != 1:
        raise ValidationError({field: ["Enter one email address."]})
    return found[0]


def _header_text(value: str, *, field: str, limit: int = 998) -> str:
    if _UNSAFE.search(value):
        raise ValidationError({field: ["Line breaks and control characters are not allowed here."]})
    if len(value) > limit:
        raise ValidationError({field: [f"At most {limit} characters."]})
    return value.strip()


# -- settings of the outgoing server ---------------------------------------------------------

def smtp_settings(mailbox: Mailbox, *, timeout: float = SMTP_TIMEOUT) -> ServerSettings:
    """Empty SMTP username: log in with the incoming username and password."""
    if not mailbox.smtp_host or not mailbox.smtp_port:
        raise MailConfigError(
            "This mailbox has no outgoing (SMTP) server.",
            hint="Add it under Server Details in the mailbox settings.",
        )
    username = mailbox.smtp_username or mailbox.username
    password = login_password(mailbox.smtp_password if mailbox.smtp_username else mailbox.password)
    return ServerSettings(host=mailbox.smtp_host, port=mailbox.smtp_port,
                          security=mailbox.smtp_security, username=username,
                          password=password, timeout=timeout,
                          allow_private_hosts=settings.MAILROOM_ALLOW_PRIVATE_MAIL_HOSTS)


def smtp_test(*, mailbox: Mailbox) -> None:
    """Log in to the mailbox's SMTP server, if it has one; raise a MailError if that fails."""
    if mailbox.smtp_host:
        smtp.check_login(smtp_settings(mailbox, timeout=15))


# -- compose ---------------------------------------------------------------------------------

def _message_id(record: RecordType | None, domain: str, tag: str | None) -> str:
    """A Message-ID that names the record the mail was sent from: replies quote it in
    In-Reply-To/References, so a reply can be traced to the record even from a new address."""
    label = tag or (f"crm.{record._meta.model_name}.{record.pk}" if record else "crm.mail")
    try:
        host = domain.encode("idna").decode("ascii")
    except UnicodeError:
        host = "mailroom.invalid"
    return f"<{label}.{secrets.token_hex(10)}@{host or 'mailroom.invalid'}>"


def _plain_msgid(value: str) -> bool:
    """A Message-ID we can quote as is: printable ASCII, no spaces, no encoded words. Other
    ids (hostile or broken received mail) would come out RFC 2047-encoded or be refused as
    header injection; they are left out of the reply's threading headers instead."""
    return bool(value) and value.isascii() and value.isprintable() and " " not in value \
        and "=?" not in value and "<" not in value and ">" not in value and len(value) <= 900


def _references(parent: Email) -> list[str]:
    refs = [r for r in parent.references if _plain_msgid(r)] + (
        [parent.message_id] if _plain_msgid(parent.message_id) else [])
    if len(refs) > MAX_REFERENCES:
        refs = refs[:1] + refs[-(MAX_REFERENCES - 1):]
    return refs


def _check_attachments(attachments: Sequence[OutgoingAttachment]) -> list[OutgoingAttachment]:
    total = sum(len(a.data) for a in attachments)
    if total > MAX_ATTACHMENTS_BYTES:
        raise ValidationError({"attachments": [
            f"Attachments may total at most {MAX_ATTACHMENTS_BYTES // (1024 * 1024)} MB "
            f"(these are {total / (1024 * 1024):.1f} MB)."]})
    cleaned = []
    for a in attachments:
        ctype = (a.content_type or "application/octet-stream").lower()
        if not re.fullmatch(r"[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*", ctype) \
                or ctype.startswith(("multipart/", "message/")):
            # A file is sent as opaque base64. multipart/* and message/* may not be base64
            # (RFC 2046 5.1, 5.2.1) and the email package wrote them with bare LF line ends,
            # so a .eml a browser uploads as message/rfc822 made _with_contents fail (a 500).
            ctype = "application/octet-stream"
        cleaned.append(OutgoingAttachment(safe_filename(a.filename, ctype), ctype, a.data))
    return cleaned


def _build(*, sender: HeaderAddress, to: list[HeaderAddress], cc: list[HeaderAddress],
           bcc: list[HeaderAddress], reply_to: HeaderAddress | None, subject: str, text: str,
           html: str, message_id: str, parent: Email | None,
           attachments: Sequence[OutgoingAttachment]) -> bytes:
    msg = EmailMessage(policy=email_policy.SMTP)  # CRLF line ends, RFC 2047 headers
    _set_addresses(msg, "From", [sender])
    _set_addresses(msg, "To", to)
    _set_addresses(msg, "Cc", cc)
    # Kept in the stored copy (and the Sent folder) as mail clients do; never transmitted.
    _set_addresses(msg, "Bcc", bcc)
    _set_addresses(msg, "Reply-To", [reply_to] if reply_to else [])
    if subject.isascii():
        msg["Subject"] = subject
    else:
        msg.set_raw("Subject", _encoded_words(subject, header_name="Subject"))
    msg["Date"] = format_datetime(timezone.now())
    msg["Message-ID"] = message_id
    if parent is not None and _plain_msgid(parent.message_id):
        msg["In-Reply-To"] = f"<{parent.message_id}>"
    if parent is not None and _references(parent):
        msg["References"] = " ".join(f"<{r}>" for r in _references(parent))
    msg["MIME-Version"] = "1.0"
    msg.set_content(text or "")
    if html:
        msg.add_alternative(html, subtype="html")
    # Each attachment is added with a short random stand-in for its content; its base64
    # lines are put in its place in the generated bytes. The email package held the
    # content ~4 times over while encoding and generating (an 18 MB file: ~117 MB more).
    stand_ins: list[tuple[bytes, bytes]] = []
    for a in attachments:
        maintype, _, subtype = a.content_type.partition("/")
        stand_in = secrets.token_bytes(45)  # one base64 line of 60 characters
        msg.add_attachment(stand_in, maintype=maintype, subtype=subtype, filename=a.filename)
        stand_ins.append((base64.b64encode(stand_in) + b"\r\n", a.data))
    smtp.check_headers(msg)
    return _with_contents(msg.as_bytes(), stand_ins)


def _encoded_words(text: str, *, header_name: str | None = None) -> str:
    """``text`` as RFC 2047 encoded words, folded between them at 78 characters.

    Python 3.11's folding of encoded words (policy.SMTP) puts the space between two words
    into the folding white space between two encoded words, which RFC 2047 6.2 says to
    drop: about a third of long non-ASCII subjects reached the recipient (and the record)
    as "ÄrgerQualität", and display names lost their spaces the same way (a list of them
    even had its separating comma encoded, merging two recipients' names). The legacy
    Header keeps every space inside the encoded text; ``set_raw`` keeps its folding."""
    return Header(text, "utf-8", header_name=header_name).encode(linesep="\r\n")


def _set_addresses(msg: EmailMessage, name: str, addresses: Sequence[HeaderAddress]) -> None:
    """An address header. All-ASCII display names: the email package's own folding (it
    quotes them as RFC 5322 needs). A non-ASCII one: each address on its own line, its
    display name as encoded words (``_encoded_words``), the address as typed."""
    if not addresses:
        return
    if all(a.display_name.isascii() for a in addresses):
        msg[name] = addresses
        return
    # Every line at most 78 characters with its comma: a longer one has the email package
    # fold the whole header again (policy refold_source "long"), with the bug above.
    parts = []
    for i, a in enumerate(addresses):
        plain = str(a)
        start = len(name) + 2 if i == 0 else 1  # "To: " or the continuation's space
        if a.display_name and (not a.display_name.isascii() or start + len(plain) > 77):
            phrase = _encoded_words(a.display_name, header_name=name if i == 0 else None)
            lines = phrase.split("\r\n")
            last = len(lines[-1]) + (start if len(lines) == 1 else 0)
            tail = f"<{a.addr_spec}>"
            parts.append(phrase + (" " if last + 1 + len(tail) <= 77 else "\r\n ") + tail)
        else:
            parts.append(plain)
    msg.set_raw(name, ",\r\n ".join(parts))


_BASE64_CHUNK = 57 * 1024  # whole lines of 57 bytes -> 76 characters, as the email package writes them


def _base64_lines(data: bytes) -> list[bytes]:
    """``data`` in base64 lines of 76 characters, each ending with CRLF (RFC 2045 6.8)."""
    return [base64.encodebytes(data[start:start + _BASE64_CHUNK]).replace(b"\n", b"\r\n")
            for start in range(0, len(data), _BASE64_CHUNK)]


def _with_contents(raw: bytes, stand_ins: list[tuple[bytes, bytes]]) -> bytes:
    """``raw`` with each stand-in line replaced by the base64 lines of its content."""
    pieces: list[bytes | memoryview] = []
    at = 0
    view = memoryview(raw)
    for line, data in stand_ins:
        where = raw.index(line, at)
        pieces.append(view[at:where])
        pieces.extend(_base64_lines(data))
        at = where + len(line)
    pieces.append(view[at:])
    return b"".join(pieces)


def _visible_record(actor: User, record: RecordType) -> None:
    if not records_visible_to(actor, type(record).objects.filter(pk=record.pk)).exists():
        raise RecordPermissionDenied("You cannot see this record.")


def email_send(
    *,
    actor: User,
    from_address: str,
    to: str | Iterable[str] = (),
    cc: str | Iterable[str] = (),
    bcc: str | Iterable[str] = (),
    subject: str,
    html: str = "",
    text: str = "",
    attachments: Sequence[OutgoingAttachment] = (),
    record: RecordType | None = None,
    in_reply_to: Email | None = None,
    reply_to: str = "",
    message_id_tag: str | None = None,
    token: str = "",
) -> Email:
    """Compose a message, store it on ``record`` with state "sending" and queue its delivery.

    Every field is checked first (addresses valid, no line breaks in any header, a From the
    actor may use, attachments within the limit); a ValidationError names the field.

    ``token`` (the compose form's, or an API Idempotency-Key): a second call with the same
    token returns the email of the first and sends nothing.
    """
    from . import senders  # noqa: PLC0415  (senders imports this module)

    token = token.strip()
    if len(token) > MAX_TOKEN_LENGTH:
        # Not cut: two long keys with a common prefix would be taken for one message (the
        # second send would return the first email and send nothing).
        raise ValidationError({TOKEN_FIELD: [
            f"At most {MAX_TOKEN_LENGTH} characters (this one has {len(token)})."]})
    if token:
        earlier = Email.objects.filter(sent_by=actor, send_token=token).first()
        if earlier is not None:
            return _not_deleted(earlier)

    if record is not None:
        _visible_record(actor, record)
    if in_reply_to is not None:
        from .selectors import emails_visible_to  # noqa: PLC0415

        if not emails_visible_to(actor).filter(pk=in_reply_to.pk).exists():
            raise RecordPermissionDenied("You cannot see the mail you are replying to.")
    chosen = senders.sender_for(actor, from_address)
    to_list = parse_address_list(to, field="to")
    cc_list = parse_address_list(cc, field="cc")
    bcc_list = parse_address_list(bcc, field="bcc")
    if not (to_list or cc_list or bcc_list):
        raise ValidationError({"to": ["Enter at least one recipient."]})
    subject = _header_text(subject, field="subject")
    reply_to_address = None
    if reply_to:
        typed = _single_address(reply_to, field="reply_to")
        known = senders.reply_to_for(actor, typed.addr_spec)
        if known is None:
            raise ValidationError({"reply_to": ["Choose one of your addresses or a verified organization email."]})
        reply_to_address = HeaderAddress(display_name=known.display_name, addr_spec=known.address)
    if _UNSAFE.sub("", chosen.display_name) != chosen.display_name:
        raise ValidationError({"from_address": ["The display name of this address has a line break."]})
    html = sanitize_html(html, allow_remote_images=True).html if html.strip() else ""
    text = text or (html_to_text(html) if html else "")
    attachments = _check_attachments(attachments)
    sender = HeaderAddress(display_name=chosen.display_name, addr_spec=chosen.address)
    message_id = _message_id(record, sender.domain, message_id_tag)
    raw = _build(sender=sender, to=to_list, cc=cc_list, bcc=bcc_list, reply_to=reply_to_address,
                 subject=subject, text=text, html=html, message_id=message_id,
                 parent=in_reply_to, attachments=attachments)
    try:
        return _store(actor=actor, mailbox=chosen.mailbox, raw=raw, text=text, html=html,
                      attachments=attachments, record=record, token=token)
    except IntegrityError:
        # The same token sent twice at once: the other request stored (and sends) it.
        earlier = Email.objects.filter(sent_by=actor, send_token=token).first() if token else None
        if earlier is None:
            raise
        return _not_deleted(earlier)


def _not_deleted(earlier: Email) -> Email:
    """The email an earlier send with the same token stored, unless it was deleted since:
    then the request is refused (sending it again would break the key's promise of one
    message; answering with a deleted email would show mail the user removed)."""
    if earlier.deleted_at is not None:
        raise ValidationError({TOKEN_FIELD: [
            "This key was used for an email that has since been deleted; use a new key."]})
    return earlier


@transaction.atomic
def _store(*, actor: User, mailbox: Mailbox, raw: bytes, text: str, html: str,
           attachments: Sequence[OutgoingAttachment], record: RecordType | None,
           token: str = "") -> Email:
    now = timezone.now()
    # The same parse the sync applies, so the fingerprint matches the Sent-folder copy.
    p = prepare(FetchedMessage(uid=0, flags=("\\Seen",), size=len(raw), internal_date=now, raw=raw))
    env = p.envelope
    sender = env.from_[0]
    email = Email.objects.create(
        mailbox=mailbox, fingerprint=p.fingerprint, message_id=env.message_id or "",
        content_hash=p.content_hash, in_reply_to=env.in_reply_to[-1] if env.in_reply_to else "",
        references=env.references, subject=env.subject, date=env.date or now,
        from_name=sender.name, from_address=sender.email,
        to=[{"name": a.name, "email": a.email} for a in env.to],
        cc=[{"name": a.name, "email": a.email} for a in env.cc],
        direction=Email.Direction.SENT, source=Email.Source.CRM, size=len(raw), seen=True,
        shareable=shareable(env, mailbox.excluded_domain_set), text=text, html=html,
        has_attachments=bool(attachments), parse_state=Email.ParseState.PARSED,
        send_state=Email.SendState.SENDING, sent_by=actor, send_attempted_at=now,
        send_token=token,
    )
    # Binary COPY, not INSERT: an INSERT sends bytea as hex text (twice the bytes, and a copy
    # more of them in this process); a mail with an 18 MB attachment took ~320 MB.
    write_sources([(email.pk, p.compressed, p.raw_size)])
    del p
    email.participants.bulk_create(_participants(email, env))
    for a in attachments:
        digest = hashlib.sha256(a.data).hexdigest()
        if not AttachmentBlob.objects.filter(sha256=digest).exists():
            write_blobs([(digest, compress(a.data), len(a.data))])  # another mail's copy wins
        blob_id = AttachmentBlob.objects.filter(sha256=digest).values_list("pk", flat=True).get()
        Attachment.objects.create(email=email, blob_id=blob_id, filename=a.filename,
                                  content_type=a.content_type, size=len(a.data))
    assign_threads(mailbox, [(email, env)])
    if record is not None:
        field = {Lead: "lead", Contact: "contact", Deal: "deal"}[type(record)]
        # Put on the record by the user: shown (never ``bcc_only``), even when the record's
        # address is only in Bcc; the association below leaves an existing link as it is.
        EmailLink.objects.get_or_create(email=email, **{field: record})
    own = {mailbox.email_address, *mailbox.aliases.values_list("address", flat=True)}
    emails_associate(email_ids=[email.pk], exclude_addresses=own)
    if isinstance(record, Deal):
        # Sent from a deal, it belongs to that deal (and, by address, to its contact): not
        # to the contact's other deals, which the association rule for mail that comes in
        # ("the deals of a matched contact") would add, listing a renewal quote on every
        # project of the customer. Replies inherit this mail's links (association).
        EmailLink.objects.filter(email=email, deal__isnull=False).exclude(deal=record).delete()
    _queue(email.pk)
    return email


def _queue(email_id: int) -> None:
    from . import tasks  # noqa: PLC0415  (tasks import services)

    transaction.on_commit(lambda: tasks.send_email.delay(email_id))


# -- deliver ---------------------------------------------------------------------------------

def _recipients(raw: bytes) -> list[str]:
    import email as email_lib  # noqa: PLC0415
    import email.parser  # noqa: F401, PLC0415

    # The header block only: parsing a large mail whole took several times its size.
    end = raw.find(b"\r\n\r\n")
    msg = email_lib.parser.BytesHeaderParser(policy=email_policy.SMTP).parsebytes(
        raw if end < 0 else raw[:end + 4])
    found = getaddresses([str(v) for name in ("To", "Cc", "Bcc") for v in msg.get_all(name, [])])
    seen: dict[str, str] = {}
    for _, addr in found:
        if addr and addr.lower() not in seen:
            seen[addr.lower()] = addr
    return list(seen.values())


def email_deliver(*, email_id: int) -> Email:
    """Send a stored "sending" mail over SMTP; then "sent" (plus the Sent-folder copy for
    IMAP) or "failed" with the reason. Mail in any other state is left alone, and so is a
    mail another delivery is sending right now (``send_claim``): that one finishes it."""
    from .sync.lock import send_claim  # noqa: PLC0415

    with send_claim(email_id) as mine:
        if not mine:
            log.info("email %s: another delivery of it is running, not sending", email_id)
            return Email.objects.select_related("mailbox").get(pk=email_id)
        # Its state is read under the claim: a delivery that held it may have sent it.
        return _deliver(email_id)


def _deliver(email_id: int) -> Email:
    email = Email.objects.select_related("mailbox__owner", "sent_by").get(pk=email_id)
    if email.send_state != Email.SendState.SENDING:
        log.info("email %s: state %r, not sending", email_id, email.send_state)
        return email
    if email.deleted_at is not None:
        # Deleted while its task waited in the queue: the user took it back, so it must not
        # reach the customer (email_send_retry refuses deleted mail for the same reason).
        log.info("email %s: deleted before it was sent, not sending", email_id)
        Email.objects.filter(pk=email.pk, send_state=Email.SendState.SENDING).update(
            send_state=Email.SendState.FAILED, send_error="Not sent: deleted before it went out.")
        email.refresh_from_db()
        return email
    mailbox = email.mailbox
    sender = email.sent_by if email.sent_by_id else mailbox.owner
    if not sender.is_active:
        # Deactivated by an administrator while the mail waited (in the queue, or for a
        # retry): a user who has left must not go on writing to customers.
        log.info("email %s: its sender is deactivated, not sending", email_id)
        Email.objects.filter(pk=email.pk, send_state=Email.SendState.SENDING).update(
            send_state=Email.SendState.FAILED,
            send_error=f"Not sent: {sender.get_username()}'s account was deactivated before it went out.")
        email.refresh_from_db()
        return email
    # By binary COPY: a SELECT brings bytea as hex text (three times its size at once).
    try:
        compressed = read_source(email.pk)
    except SourceStoreError as exc:
        # Its stored copy cannot be read (a pack gone, the directory not mounted): say so
        # on the mail, never leave it "sending".
        log.warning("email %s: not sent, its stored copy cannot be read (%s)", email_id, exc)
        Email.objects.filter(pk=email.pk, send_state=Email.SendState.SENDING).update(
            send_state=Email.SendState.FAILED, send_error=f"Not sent: {exc}"[:2000])
        email.refresh_from_db()
        return email
    if compressed is None:
        raise EmailSource.DoesNotExist("the mail has no stored source")
    raw = decompress(compressed)
    del compressed
    note = ""
    try:
        # Envelope sender: the mailbox's own address, so bounces come back to the mailbox
        # the CRM syncs, whatever From (alias, organization address) the mail shows.
        refused = smtp.send(smtp_settings(mailbox), raw, sender=mailbox.email_address,
                            recipients=_recipients(raw))
    except MailDeliveryUncertain as exc:
        # Most likely delivered (only the server's answer was lost): "sent", with the doubt
        # said, and no "Send again" offered; a second copy would reach the customer.
        log.info("email %s: delivery uncertain (%s)", email_id, exc.code)
        note = str(exc)
    except MailError as exc:
        log.info("email %s: sending failed (%s)", email_id, exc.code)
        Email.objects.filter(pk=email.pk, send_state=Email.SendState.SENDING).update(
            send_state=Email.SendState.FAILED, send_error=str(exc)[:2000])
        email.refresh_from_db()
        return email
    else:
        if refused:
            note = "Sent, but the server refused " + "; ".join(
                f"{address} ({reply})" for address, reply in refused.items()) + "."
    Email.objects.filter(pk=email.pk).update(send_state=Email.SendState.SENT, send_error=note[:2000])
    if mailbox.protocol == Mailbox.Protocol.IMAP:
        try:
            _append_to_sent(mailbox, raw)
        except MailError as exc:
            # Sent all the same: say so, without offering to send it again.
            log.info("email %s: sent, but not copied to Sent (%s)", email_id, exc.code)
            Email.objects.filter(pk=email.pk).update(
                send_error=" ".join(filter(None, [note, f"Not copied to the Sent folder: {exc}"]))[:2000]
                if note else f"Sent, but not copied to the Sent folder: {exc}"[:2000])
    email.refresh_from_db()
    return email


def _append_to_sent(mailbox: Mailbox, raw: bytes) -> str | None:
    from .protocols.imap import ImapSession  # noqa: PLC0415
    from .sync.imap import server_settings  # noqa: PLC0415

    from .sync.lock import connection_slot  # noqa: PLC0415

    # The mailbox's one connection besides IDLE: a running sync hands it over between batches.
    with connection_slot(mailbox.pk, wait=60), \
            ImapSession(server_settings(mailbox, timeout=30)) as session:
        # The same Sent folder the sync picks (SPECIAL-USE, else by name, in any case).
        sent = session.sent_folder()
        if sent is None:
            raise MailConfigError("The mailbox has no Sent folder.")
        session.append(sent, raw, flags=["\\Seen"], when=timezone.now())
    return sent


def send_is_stuck(email: Email) -> bool:
    """Still "sending" long after the attempt was queued: its worker died."""
    attempted = email.send_attempted_at or email.created_at
    return email.send_state == Email.SendState.SENDING and attempted < timezone.now() - STALE_SENDING


def email_send_retry(*, actor: User, email: Email) -> Email:
    """Send a failed mail again (or one stuck in "sending" after its worker died)."""
    if actor.pk not in {email.sent_by_id, email.mailbox.owner_id}:
        raise RecordPermissionDenied("Only the sender may send this mail again.")
    stuck = send_is_stuck(email)
    if email.deleted_at is not None:
        raise ValidationError({"send_state": ["This mail has been deleted."]})
    if email.send_state != Email.SendState.FAILED and not stuck:
        raise ValidationError({"send_state": ["Only a mail that failed to send can be sent again."]})
    from . import senders  # noqa: PLC0415  (senders imports this module)

    # The From is checked again, as email_send checks it: an alias deleted or an
    # organization email withdrawn since the first attempt must not go out on Retry.
    if email.from_address.lower() not in {a.lower() for c in senders.sender_choices(actor)
                                        for a in (c.address, _ascii_domain(c.address))}:
        raise ValidationError({"from_address": [
            f"You may no longer send as {email.from_address!r}: write the mail again from "
            "another address."]})
    with transaction.atomic():
        # Compare-and-set: a double click queues one delivery, not two; a mail deleted
        # meanwhile is not sent.
        queued = Email.objects.filter(pk=email.pk, send_state=email.send_state, deleted_at__isnull=True).update(
            send_state=Email.SendState.SENDING, send_error="", send_attempted_at=timezone.now())
        if queued:
            _queue(email.pk)
    email.refresh_from_db()
    if not queued and email.deleted_at is not None:
        raise ValidationError({"send_state": ["This mail has been deleted."]})
    return email


# -- replies ---------------------------------------------------------------------------------

def reply_defaults(*, email: Email, reply_all: bool = False) -> dict[str, str]:
    """To, Cc, Subject and a quoted body for a reply to ``email``."""
    from django.utils.html import escape  # noqa: PLC0415

    subject = _UNSAFE.sub(" ", email.subject or "")
    if not re.match(r"^\s*re\s*:", subject, re.I):
        subject = f"Re: {subject}".strip()
    reply_to = list(email.participants.filter(role="reply_to").values_list("address", flat=True))
    if email.direction == Email.Direction.SENT:
        to = [a["email"] for a in email.to]
    else:
        to = reply_to or [email.from_address]
    cc = [a["email"] for a in (email.to + email.cc)] if reply_all else []
    # The user's own addresses (the mailbox's and its aliases, as _store's association) are
    # not copied: a reply-all to mail sent to an alias put that alias in Cc, and the sender
    # again when a mail program had changed the case of an address.
    own = {a.lower() for a in [email.mailbox.email_address,
                               *email.mailbox.aliases.values_list("address", flat=True)]}
    taken = own | {a.lower() for a in to}
    cc = [a for a in cc if a.lower() not in taken and not taken.add(a.lower())]
    if email.html:
        quoted = sanitize_html(email.html).html
    else:
        quoted = escape(email.text).replace("\r\n", "\n").replace("\n", "<br>")
    when = timezone.localtime(email.date).strftime("%d %b %Y %H:%M") if email.date else ""
    who = escape(f"{email.from_name} <{email.from_address}>" if email.from_name else email.from_address)
    body = (f"<p><br></p><p>On {when}, {who} wrote:</p>"
            f"<blockquote>{quoted}</blockquote>")
    return {"to": ", ".join(to), "cc": ", ".join(cc), "subject": subject, "html": body}
