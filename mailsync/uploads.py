"""Attachments over the limit are refused while they arrive, not after they were stored and
read: a 500 MB upload was first stored whole (on disk), then read whole into memory by the
send endpoint and the compose page, to be refused by ``sending.email_send`` (found in
review). The API and the page refuse differently (``over_limit``)."""
from __future__ import annotations

from django.core.files.uploadhandler import FileUploadHandler
from django.http import HttpRequest


class AttachmentsLimit(FileUploadHandler):
    """Counts the bytes of the request's files as they arrive, before any other upload
    handler stores them (insert it first in ``request.upload_handlers``, before anything
    reads the body), and calls ``over_limit`` as soon as they pass ``limit``."""

    def __init__(self, request: HttpRequest, *, limit: int) -> None:
        super().__init__(request)
        self.limit = limit
        self.received = 0

    def receive_data_chunk(self, raw_data: bytes, start: int) -> bytes:
        self.received += len(raw_data)
        if self.received > self.limit:
            # What was stored of the file being read goes (a temporary file).
            for handler in self.request.upload_handlers:
                if handler is not self:
                    handler.upload_interrupted()
            self.over_limit()
        return raw_data

    def over_limit(self) -> None:
        """Raise: the request's reading ends here."""
        raise NotImplementedError

    def file_complete(self, file_size: int) -> None:
        return None  # the next handler makes the file
