"""OpenAPI schema additions: the error answers every endpoint may give, in their one shape
(crm.api.errors: ``{"detail", "code", "errors"}``), so that a client generated from the
schema knows them (drf-spectacular documents only the success answers by itself)."""
from __future__ import annotations

from typing import Any

ERROR_SCHEMA = {
    "type": "object",
    "description": "Every API error: a sentence, a machine-readable code, and the messages "
                   "by field (empty when the error is not about a field).",
    "properties": {
        "detail": {"type": "string"},
        "code": {"type": "string"},
        "errors": {"type": "object", "additionalProperties": {"type": "array", "items": {"type": "string"}}},
    },
    "required": ["detail", "code", "errors"],
}

_WRITES = {"post", "put", "patch"}


def add_error_responses(result: dict[str, Any], generator: object, request: object,
                        public: bool) -> dict[str, Any]:
    """drf-spectacular postprocessing hook: 400 (writes), 401, 403, 404 (paths with an id)
    on every operation that does not document them already."""
    result.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR_SCHEMA
    body = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    for path, operations in result.get("paths", {}).items():
        for method, operation in operations.items():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            answers = {
                "401": "Not authenticated: no token, or a token that is not valid.",
                "403": "Authenticated, but not allowed to do this.",
            }
            if method in _WRITES:
                answers["400"] = "Invalid input: the messages by field are in errors."
            if "{" in path:
                answers["404"] = "No such object, or none visible to you."
            for code, description in answers.items():
                operation["responses"].setdefault(code, {"description": description, "content": body})
    return result
