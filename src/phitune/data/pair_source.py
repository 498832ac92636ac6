"""Tell preference data from supervised data by its first record, so eval and data inspect read either."""
from __future__ import annotations

from pathlib import Path

from phitune.data import sources


def is_pair_source(path: str | Path, split: str = "train", columns: dict[str, str] | str | None = None) -> bool:
    """True when the source's first record (after the --columns mapping) has 'chosen' or 'rejected'.

    Errors of the source itself (a missing file, a bad first line, a missing mapped column) are raised here
    as the readers would raise them."""
    if isinstance(columns, str) or columns is None:
        columns = sources.parse_columns(columns)
    items = sources.mapped(sources.rows(path, sources.detect_kind(path), split), path, columns)
    from phitune.data.pairs import is_pair_record
    for _, obj in items:
        return is_pair_record(obj)
    return False
