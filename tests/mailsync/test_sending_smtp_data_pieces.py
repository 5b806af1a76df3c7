"""DATA written in pieces (smtp._sendmail_in_pieces): what the server receives is exactly
what aiosmtplib's own DATA would have sent, for the line ends and leading dots that sit on
a piece boundary too, and the SIZE declared is the size transmitted. Against the real SMTP
server of the testbed (aiosmtpd), which undoes the dot-stuffing as any server does."""
from __future__ import annotations

import pytest
from aiosmtplib.protocol import normalize_message_line_endings

from mailsync.protocols import smtp
from mailsync.protocols.base import ServerSettings


def _settings(outbox) -> ServerSettings:  # noqa: ANN001
    return ServerSettings(outbox.host, outbox.port, "starttls", outbox.username, outbox.password,
                          timeout=30, allow_private_hosts=True)


def _line_at(prefix_size: int, line: bytes) -> bytes:
    """Filler lines of 64 bytes up to ``prefix_size`` bytes, then ``line``."""
    filler = b"x" * 62 + b"\r\n"
    count, rest = divmod(prefix_size, len(filler))
    return filler * count + b"y" * max(rest - 2, 0) + (b"\r\n" if rest >= 2 else b"") + line


def _mail(body: bytes, *, bcc: bool = False) -> bytes:
    head = b"From: a@b.example\r\nTo: c@d.example\r\n" + (b"Bcc: hidden@e.example\r\n" if bcc else b"")
    return head + b"Subject: pieces\r\n\r\n" + body


@pytest.mark.parametrize("shift", [0, 1, 2, 3])
def test_leading_dots_and_odd_line_ends_arrive_as_aiosmtplib_would_send_them(smtp_outbox, shift):
    """Lines that start with a dot (".", "..", ".x") right at and around the 1 MB piece
    boundaries, a bare LF, a lone CR and a CRLF split across the boundary: received ==
    aiosmtplib's normalization of the message (dots unstuffed by the server)."""
    piece = smtp.DATA_PIECE
    body = (_line_at(piece - 200 + shift, b".first dot line\r\n")
            + b".\r\n..\r\n.x\r\nbare LF\nlone CR\rend\r\n"
            + _line_at(piece - 5 - shift, b".\r\n" + b"..two\r\n" + b"\r")
            + b"\n.after a CRLF split across pieces\r\n" + b"z" * 100 + b"\n.last\r\n")
    raw = _mail(body)
    refused = smtp.send(_settings(smtp_outbox), raw, sender="a@b.example", recipients=["c@d.example"])
    assert refused == {}
    [got] = smtp_outbox.wait_for(1)
    assert got.raw == normalize_message_line_endings(raw)


def test_a_mail_without_a_final_line_end_gets_one_and_bcc_is_not_transmitted(smtp_outbox):
    raw = _mail(b"last line without CRLF\r\n.dot", bcc=True)
    smtp.send(_settings(smtp_outbox), raw, sender="a@b.example",
              recipients=["c@d.example", "hidden@e.example"])
    [got] = smtp_outbox.wait_for(1)
    assert got.raw == (b"From: a@b.example\r\nTo: c@d.example\r\nSubject: pieces\r\n\r\n"
                       b"last line without CRLF\r\n.dot\r\n")
    assert set(got.rcpt_tos) == {"c@d.example", "hidden@e.example"}


def test_the_declared_size_is_the_size_transmitted(smtp_outbox):
    """RFC 1870: SIZE counts the message as DATA transmits it (CRLF line ends, before the
    dot-stuffing); a server that enforces its limit compares the two."""
    raw = _mail(b"a bare LF\n" * 300_000 + b"x" * 10 + b"\r\n")
    smtp.send(_settings(smtp_outbox), raw, sender="a@b.example", recipients=["c@d.example"])
    [got] = smtp_outbox.wait_for(1)
    sizes = [o.split("=", 1)[1] for o in got.mail_options if o.upper().startswith("SIZE=")]
    assert sizes == [str(len(got.raw))]
    assert got.raw == normalize_message_line_endings(raw)


def test_a_refused_recipient_is_reported_and_the_others_get_the_mail(smtp_outbox, monkeypatch):
    """sendmail's contract is kept: some recipients refused -> returned with the server's
    reply, the mail goes to the rest; all refused -> RecipientsRefused, nothing sent."""
    from aiosmtpd.smtp import SMTP as ServerSMTP

    real = ServerSMTP.smtp_RCPT

    async def rcpt(self, arg):  # noqa: ANN001, ANN202
        if arg and "refused@" in arg:
            await self.push("550 5.1.1 No such user here")
            return None
        return await real(self, arg)

    monkeypatch.setattr(ServerSMTP, "smtp_RCPT", rcpt)  # the real server, told to refuse one address
    raw = _mail(b"hello\r\n")
    refused = smtp.send(_settings(smtp_outbox), raw, sender="a@b.example",
                        recipients=["c@d.example", "refused@e.example"])
    assert list(refused) == ["refused@e.example"] and refused["refused@e.example"].startswith("550")
    [got] = smtp_outbox.wait_for(1)
    assert got.rcpt_tos == ("c@d.example",)
    with pytest.raises(smtp.RecipientsRefused):
        smtp.send(_settings(smtp_outbox), raw, sender="a@b.example", recipients=["refused@e.example"])
    assert len(smtp_outbox.messages) == 1


def test_pieces_end_at_line_ends_and_rejoin_to_the_message():
    """The splitting itself, including a line longer than a piece and parts that end
    mid-line (the header block, then the blank line, then the body)."""
    long_line = b"L" * (3 * smtp.DATA_PIECE + 17) + b"\r\n"
    parts = (b"Subject: x\r\nX: y", b"\r\n\r\n", memoryview(b"a\r\n" + long_line + b".b\r\nc"))
    pieces = list(smtp._lines_in_pieces(parts))
    assert b"".join(pieces) == b"".join(bytes(p) for p in parts)
    assert all(p.endswith(b"\n") for p in pieces[:-1])
    wire = b"".join(smtp._wire_pieces(parts))
    assert wire == normalize_message_line_endings(b"".join(bytes(p) for p in parts)).replace(b"\r\n.b", b"\r\n..b")
