"""The OpenAPI 3.1 document of the public API: `anon_ticket/openapi.json`, package data.

The public listener serves it as is at `GET /api/v1/openapi.json`, read once when its app is
built. tests/test_openapi.py holds it to the app's routes, to README.md and to real answers;
tests/process/test_openapi_fuzz.py fuzzes the real server with it (schemathesis).
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

PATH = "/api/v1/openapi.json"


def document_bytes() -> bytes:
    """The checked-in document, byte for byte (checked to be a JSON object)."""
    raw = resources.files("anon_ticket").joinpath("openapi.json").read_bytes()
    if not isinstance(json.loads(raw), dict):
        raise ValueError("anon_ticket/openapi.json is not a JSON object")
    return raw


def document() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(document_bytes())
    return doc
