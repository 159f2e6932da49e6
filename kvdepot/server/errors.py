"""The core's one error: a request it refuses, with the protocol's code for it."""

from __future__ import annotations

from kvdepot.protocol import ErrorCode


class CacheError(Exception):
    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message
