"""One place for the farm's errors.

Every error says what was wrong and how to fix it, and carries the exit code
the CLI uses and the HTTP status the API answers with, so both faces report
the same thing the same way.

    ImgfarmError (exit 1, HTTP 500)
    +-- InvalidInput (exit 2, HTTP 400)       a bad argument: name, range, format
    |   +-- NodeRangeError                    a node range that does not parse
    |   +-- DriverSettingsError               a node's driver settings are incomplete
    +-- NotFound (exit 3, HTTP 404)           an unknown node, image or job
    +-- Conflict (exit 4, HTTP 409)           the node is busy, the name is taken
    +-- Unauthorized (exit 5, HTTP 401)       an agent call without the job's token
    +-- ImageError (exit 6, HTTP 422)         an image that is corrupt or incomplete
    +-- DriverError (exit 7, HTTP 502)        a boot/power driver call failed
    +-- ServiceUnavailable (exit 8, HTTP 503) the job database or the broker cannot be used
"""

from __future__ import annotations


class ImgfarmError(Exception):
    exit_code = 1
    http_status = 500

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class InvalidInput(ImgfarmError):
    exit_code = 2
    http_status = 400


class NodeRangeError(InvalidInput):
    pass


class DriverSettingsError(InvalidInput):
    pass


class NotFound(ImgfarmError):
    exit_code = 3
    http_status = 404


class Conflict(ImgfarmError):
    exit_code = 4
    http_status = 409


class Unauthorized(ImgfarmError):
    exit_code = 5
    http_status = 401


class Forbidden(Unauthorized):
    """A valid credential whose scope does not cover the request."""

    http_status = 403


class ImageError(ImgfarmError):
    exit_code = 6
    http_status = 422


class DriverError(ImgfarmError):
    exit_code = 7
    http_status = 502


class ServiceUnavailable(ImgfarmError):
    exit_code = 8
    http_status = 503
