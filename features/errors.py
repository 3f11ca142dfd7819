"""Errors raised by the feature layer.

Every error names *where* (file, row, subject, column) and *what* was expected, and never
echoes a clinical value: only the subject id may appear in a message.
"""

from __future__ import annotations


class FeaturesError(ValueError):
    """Base class of every error raised by ``features``; maps to HTTP 422 at the edge."""

    http_status = 422


class DataValidationError(FeaturesError):
    """Input events that break the MEDS contract.

    Parameters
    ----------
    message:
        What is wrong and what was expected.
    source:
        The file (or request) the data came from.
    row:
        Zero-based row index within ``source``, when one row is to blame.
    column:
        The offending column.
    subject_id:
        The subject the row belongs to, when known.
    """

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        row: int | None = None,
        column: str | None = None,
        subject_id: int | None = None,
        count: int = 1,
        line: int | None = None,
    ) -> None:
        self.source = source
        self.row = row
        self.column = column
        self.subject_id = subject_id
        self.count = count
        self.line = line
        self.detail = message
        where = []
        if source is not None:
            where.append(str(source))
        if line is not None:
            where.append(f"line {line}")
        elif row is not None:
            where.append(f"row {row}")
        if subject_id is not None:
            where.append(f"subject {subject_id}")
        if column is not None:
            where.append(f"column '{column}'")
        more = f" ({count - 1} more rows like it)" if count > 1 else ""
        super().__init__(f"{', '.join(where)}: {message}{more}" if where else message + more)


class TaskError(FeaturesError):
    """A task file that does not validate."""


class FeatureSpecError(FeaturesError):
    """Events or settings that do not fit a frozen FeatureSpec."""
