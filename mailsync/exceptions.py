"""Mail errors, split by who can fix them.

``MailUserError`` subclasses are faults the mailbox owner fixes (wrong password, IMAP disabled
at the provider): no automatic retry, the status says what to do. ``MailTransientError``
subclasses are worth retrying with backoff (network down, server busy).
"""
from __future__ import annotations

from crm.exceptions import ServiceError


class MailError(ServiceError):
    code = "mail_error"


class MailUserError(MailError):
    """The user must change something before a retry can succeed."""


class MailTransientError(MailError):
    """A retry later may succeed."""

    http_status = 502  # the mail server, not the request, is at fault


class MailAuthError(MailUserError):
    code = "auth_failed"


class MailTLSError(MailUserError):
    code = "tls_error"


class MailConfigError(MailUserError):
    code = "config_error"


class SourceStoreError(MailTransientError):
    """A raw source could not be written or read on this server's disk
    (``mailsync.sourcestore``): the message says what the administrator should check."""

    code = "storage"
    http_status = 503


class MailServerUnreachable(MailTransientError):
    code = "unreachable"
    http_status = 400  # usually a wrong host or port in what the user entered


class MailConnectionsLimit(MailTransientError):
    """The server refused a login because the account has too many connections open."""

    code = "too_many_connections"
    http_status = 503


class MailProtocolError(MailTransientError):
    code = "protocol_error"


class MailDeliveryUncertain(MailError):
    """The SMTP server stopped answering after it was handed the message: it may have been
    delivered. Never to be sent again without the user knowing (a customer would get it
    twice)."""

    code = "delivery_uncertain"
    http_status = 502


class MailboxBusy(MailTransientError):
    """Another sync of this mailbox holds the lock."""

    code = "busy"
    http_status = 409


class ConnectionBusy(MailTransientError):
    """The mailbox's one connection besides IDLE stayed in use (a sync, another action) for
    longer than this caller waits (``mailsync.sync.lock.ConnectionSlot``)."""

    code = "connection_busy"
    http_status = 409


class MailboxOutOfDate(MailTransientError):
    """The server's folder changed (UIDVALIDITY) since the last sync: act after the next."""

    code = "out_of_date"
    http_status = 409


class MailboxHoldsMail(ServiceError):
    """Deleting this mailbox would remove mail from the CRM: the caller must say so."""

    code = "holds_mail"
    http_status = 409
