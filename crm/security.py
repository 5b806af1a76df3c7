"""A Content-Security-Policy on every page that does not set its own.

The pages load their scripts and styles from /static/ only and use no inline script or event
handler, so ``script-src 'self'`` costs nothing and turns any HTML that slips into a page
(a quoted mail in the compose editor, say, which mail.js puts into a contenteditable) into
inert markup: no inline script, handler or javascript: URL runs. Images are same-origin or
data: only, so a quoted mail's remote images (tracking pixels) do not load in the editor.
Inline styles stay allowed (the Django admin uses style attributes). The sandboxed email
body and attachment downloads set stricter policies of their own, which are kept.
"""
from __future__ import annotations

from collections.abc import Callable

from django.http import HttpRequest, HttpResponse
from django.views.debug import SafeExceptionReporterFilter

POLICY = "; ".join([
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self' 'unsafe-inline'",
    "img-src 'self' data:",
    "font-src 'self' data:",
    "connect-src 'self'",
    "frame-src 'self'",
    "object-src 'none'",
    "base-uri 'self'",
    "form-action 'self'",
    "frame-ancestors 'none'",
])


class ContentSecurityPolicyMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        response.headers.setdefault("Content-Security-Policy", POLICY)
        return response


class SecretsReporterFilter(SafeExceptionReporterFilter):
    """Django's debug 500 page (DEBUG only) shows every frame's locals; those of DRF and of
    our own code can hold a mailbox password (request data, a serializer built from it). Any
    local whose name or printed value mentions a password is hidden, not only the settings
    and the functions marked ``sensitive_variables``."""

    def get_traceback_frame_variables(self, request, tb_frame):  # noqa: ANN001, ANN201
        cleaned = []
        for name, value in super().get_traceback_frame_variables(request, tb_frame):
            try:
                shown = repr(value)
            except Exception:  # noqa: BLE001  (a repr that fails hides nothing)
                shown = ""
            if self.hidden_settings.search(name) or "password" in shown.lower():
                value = self.cleansed_substitute
            cleaned.append((name, value))
        return cleaned
