"""The one error type users see: a message that names the input and the fix."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path


class PhituneError(Exception):
    """Bad input or an unusable environment. The CLI prints it and exits with code 2."""


class DataError(PhituneError):
    """A dataset line that cannot be used; the message names file and line."""

    def __init__(self, path: str | Path, line: int | None, problem: str) -> None:
        self.path, self.line, self.problem = str(path), line, problem
        where = f"{path}:{line}" if line else f"{path}"
        super().__init__(f"{where}: {problem}")


class ConfigError(PhituneError):
    """A configuration field with a value phitune cannot use."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        super().__init__(f"{field}: {problem}")
