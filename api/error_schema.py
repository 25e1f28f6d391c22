"""The farm's error answers, declared in the OpenAPI schema.

Every error the API gives is `{"error": ..., "hint": ...}` with the status of the farm's
error class (imgfarm/errors.py), and a 422 is the same shape (app.py's handler), not
FastAPI's `{"detail": [...]}`. Declaring them here keeps /openapi.json true to what
clients get, so a schema-driven client (or schemathesis) can check every answer.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

ERROR = {
    "type": "object", "title": "Error", "required": ["error"],
    "properties": {"error": {"type": "string", "description": "what was wrong, naming the input"},
                   "hint": {"anyOf": [{"type": "string"}, {"type": "null"}],
                            "description": "how to fix it"}},
}
STATUSES = {
    "400": "bad input", "401": "no or wrong credential", "403": "the credential's scope does not allow it",
    "404": "no such node, image, job or window", "409": "conflicts with the farm's state",
    "413": "request body too large", "422": "a field has the wrong type or value",
    "502": "a boot or power driver failed", "503": "the job database or the broker cannot be used",
}


def farm_openapi(app: FastAPI) -> dict[str, Any]:
    """The app's schema with the error answers every operation can give."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description,
                             routes=app.routes)
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        schemas["Error"] = ERROR
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        ref = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
        for item in schema.get("paths", {}).values():
            for operation in item.values():
                responses = operation.setdefault("responses", {})
                for code, text in STATUSES.items():
                    responses[code] = {"description": text, **ref}
        app.openapi_schema = schema
    return app.openapi_schema
