"""The error every HTTP handler raises to answer with something other than success.

Its own module, free of imports, so the compiled core can raise it too (the trigger's field
checks run there) without an import cycle through http_api.
"""

from __future__ import annotations

from typing import Any


class HttpError(Exception):
    """An answer other than success: JSON {"error": message, **body} with the status."""

    def __init__(self, status: int, message: str, headers: list[tuple[str, str]] | None = None,
                 body: dict[str, Any] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers
        self.body = body

    def payload(self) -> dict[str, Any]:
        return {"error": self.message, **(self.body or {})}
