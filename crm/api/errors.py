"""One shape for every API error: ``{"detail": str, "code": str, "errors": {field: [str]}}``.

Business-rule errors raised by services (Django's ValidationError and PermissionDenied
subclasses) become 400 and 403 here, so services need not know about HTTP.
"""
from __future__ import annotations

from typing import Any

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import Http404, HttpRequest, JsonResponse
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from ..exceptions import EncryptionNotConfigured, ServiceError


def _flatten(detail: Any) -> dict[str, list[str]]:
    if isinstance(detail, dict):
        return {
            str(key): [str(item) for item in (value if isinstance(value, list) else [value])]
            for key, value in detail.items()
        }
    if isinstance(detail, list):
        return {"non_field_errors": [str(item) for item in detail]}
    return {"non_field_errors": [str(detail)]}


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
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


def api_not_found(request: HttpRequest, exception: Exception | None = None, **kwargs: object) -> JsonResponse:
    """404 for unknown URLs under /api/: JSON like every other API error, not an HTML page."""
    return JsonResponse(
        {"detail": f"No API endpoint at {request.path}.", "code": "not_found", "errors": {}},
        status=404,
    )
