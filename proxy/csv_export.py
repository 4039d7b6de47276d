"""Tables as CSV downloads, written out as their rows come (a table read through a cursor never sits whole in
memory), with cells a spreadsheet will not run."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterable, AsyncIterator, Mapping, Sequence
from typing import Any

import orjson
from starlette.responses import StreamingResponse

from .pages import SECURITY_HEADERS

Rows = Sequence[Mapping[str, Any]] | AsyncIterable[Mapping[str, Any]]
_CHUNK = 64 * 1024


def safe_cell(value: object) -> object:
    """A CSV cell a spreadsheet will not run: text starting like a formula gets a leading quote."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def cell(value: object) -> object:
    """A value as a cell: JSON for objects and lists, empty for none; formulas defused."""
    if isinstance(value, (dict, list)):
        value = orjson.dumps(value).decode()
    return "" if value is None else safe_cell(value)


def csv_response(name: str, columns: Sequence[str], rows: Rows) -> StreamingResponse:
    async def lines() -> AsyncIterator[str]:
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(columns)
        async for row in _each(rows):
            writer.writerow([cell(row.get(c)) for c in columns])
            if out.tell() > _CHUNK:
                yield out.getvalue()
                out.seek(0)
                out.truncate()
        yield out.getvalue()

    headers = {**SECURITY_HEADERS, "Content-Disposition": f'attachment; filename="{name}"'}
    return StreamingResponse(lines(), media_type="text/csv; charset=utf-8", headers=headers)


async def _each(rows: Rows) -> AsyncIterator[Mapping[str, Any]]:
    if isinstance(rows, Sequence):
        for row in rows:
            yield row
    else:
        async for row in rows:
            yield row
