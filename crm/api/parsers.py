"""Request body parsers of the API."""
from __future__ import annotations

from rest_framework import parsers
from rest_framework.exceptions import ParseError


class JSONParser(parsers.JSONParser):
    """DRF's, but a body nested deeper than Python's recursion limit (100 KB of ``[``) is a
    400 parse error: the stdlib decoder raises RecursionError, not the ValueError DRF
    catches, and the request was a 500 (found in review)."""

    def parse(self, stream, media_type=None, parser_context=None):  # noqa: ANN001, ANN201
        try:
            return super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise ParseError("JSON parse error - the body is nested too deeply.") from None


PARSER_CLASSES = [JSONParser, parsers.FormParser, parsers.MultiPartParser]
