"""One shape for every API error: ``{"detail": str, "code": str, "errors": {field: [str]}}``.

Business-rule errors raised by services (Django's ValidationError and PermissionDenied
subclasses) become 400 and 403 here, so services need not know about HTTP.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from django.conf import settings
from django.core.exceptions import (
    PermissionDenied as DjangoPermissionDenied,
    RequestDataTooBig,
    SuspiciousOperation,
    TooManyFieldsSent,
    TooManyFilesSent,
)
from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.views import defaults
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from ..exceptions import EncryptionNotConfigured, ServiceError


def _flatten(detail: Any) -> dict[str, list[str]]:
    """``{field: [message]}``. Errors of items inside a field (a ListField's child, a nested
    or many=True serializer, a DictField) are keyed by their path, ``attachments[2]`` or
    ``items[0].name``: str() of the nested dict was sent as the message, a Python repr such
    as "{2: [ErrorDetail(string='...', code='empty')]}" (found in review)."""
    errors: dict[str, list[str]] = {}
    for path, message in _messages(detail, ""):
        errors.setdefault(path or "non_field_errors", []).append(message)
    return errors


def _messages(detail: Any, path: str) -> Iterator[tuple[str, str]]:
    if isinstance(detail, dict):
        for key, value in detail.items():
            # A ListField's child errors are keyed by the item's index (an int).
            sub = f"{path}[{key}]" if isinstance(key, int) else (f"{path}.{key}" if path else str(key))
            yield from _messages(value, sub)
    elif isinstance(detail, list):
        for index, item in enumerate(detail):
            # A list of messages, or (a many=True serializer) one error dict per item, with
            # {} for the valid ones.
            yield from (_messages(item, f"{path}[{index}]") if isinstance(item, (dict, list))
                        else [(path, str(item))])
    else:
        yield path, str(detail)


def _suspicious(exc: SuspiciousOperation) -> tuple[dict[str, Any], int]:
    """A request Django refuses to read (too many query parameters or form fields, a body
    field over DATA_UPLOAD_MAX_MEMORY_SIZE): what to send instead, and the status."""
    if isinstance(exc, RequestDataTooBig):
        return ({"detail": "The request body is too large.", "code": "request_too_large", "errors": {}},
                status.HTTP_413_REQUEST_ENTITY_TOO_LARGE)
    if isinstance(exc, TooManyFieldsSent):
        return ({"detail": "Too many query parameters or form fields (at most "
                           f"{settings.DATA_UPLOAD_MAX_NUMBER_FIELDS}).",
                 "code": "too_many_fields", "errors": {}}, status.HTTP_400_BAD_REQUEST)
    if isinstance(exc, TooManyFilesSent):
        return ({"detail": "Too many files (at most "
                           f"{settings.DATA_UPLOAD_MAX_NUMBER_FILES}).",
                 "code": "too_many_files", "errors": {}}, status.HTTP_400_BAD_REQUEST)
    return {"detail": "Bad request.", "code": "bad_request", "errors": {}}, status.HTTP_400_BAD_REQUEST


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, SuspiciousOperation):
        # Logged as Django logs it when it answers these itself (django.security.*).
        logging.getLogger(f"django.security.{exc.__class__.__name__}").error(str(exc))
        body, code = _suspicious(exc)
        return Response(body, status=code)
    if isinstance(exc, DjangoValidationError):
        exc = exceptions.ValidationError(
            exc.message_dict if hasattr(exc, "error_dict") else {"non_field_errors": exc.messages}
        )
    elif isinstance(exc, DjangoPermissionDenied):
        exc = exceptions.PermissionDenied(str(exc) or None)
    elif isinstance(exc, Http404):
        exc = exceptions.NotFound(str(exc) or None)
    elif isinstance(exc, ServiceError):
        return Response(
            {"detail": exc.message, "code": exc.code, "hint": exc.hint, "errors": {}},
            status=exc.http_status,
        )
    elif isinstance(exc, EncryptionNotConfigured):
        return Response(
            {"detail": "The server's encryption keys are not configured.", "code": "server_misconfigured", "errors": {}},
            status=status.HTTP_503_SERVICE_UNAVAILABLE,
        )

    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    if isinstance(exc, exceptions.ValidationError):
        errors = _flatten(exc.detail)
        first = next(iter(errors.items()), None)
        message = (
            f"Invalid input: {first[0]}: {first[1][0]}" if first and first[0] != "non_field_errors"
            else (first[1][0] if first else "Invalid input.")
        )
        response.data = {"detail": message, "code": "invalid", "errors": errors}
    elif isinstance(exc, exceptions.APIException):
        detail = exc.detail
        response.data = {
            "detail": str(detail if not isinstance(detail, (dict, list)) else exc.default_detail),
            "code": exc.get_codes() if isinstance(exc.get_codes(), str) else exc.default_code,
            "errors": _flatten(detail) if isinstance(detail, (dict, list)) else {},
        }
    return response


def _is_api(request: HttpRequest) -> bool:
    return request.path == "/api" or request.path.startswith("/api/")


def bad_request(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """handler400: for a request Django refused before a view answered (a SuspiciousOperation
    in a middleware, say), JSON under /api/, the normal page elsewhere."""
    if not _is_api(request):
        return defaults.bad_request(request, exception)
    body, code = (_suspicious(exception) if isinstance(exception, SuspiciousOperation)
                  else ({"detail": "Bad request.", "code": "bad_request", "errors": {}}, 400))
    return JsonResponse(body, status=code)


def server_error(request: HttpRequest) -> HttpResponse:
    """handler500: JSON under /api/, the normal page elsewhere."""
    if not _is_api(request):
        return defaults.server_error(request)
    return JsonResponse({"detail": "Server error.", "code": "server_error", "errors": {}}, status=500)


def api_not_found(request: HttpRequest, exception: Exception | None = None, **kwargs: object) -> JsonResponse:
    """404 for unknown URLs under /api/: JSON like every other API error, not an HTML page."""
    return JsonResponse(
        {"detail": f"No API endpoint at {request.path}.", "code": "not_found", "errors": {}},
        status=404,
    )
