"""Writing rows (lists of dicts) to a stream as a table, JSON or CSV.

Owns only presentation: JSON is a list of objects with every field in full; CSV has a header
row; the table folds newlines and cuts long cells so it stays readable in a terminal. It knows
nothing of where the rows come from.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

FORMATS = ("table", "json", "csv")
TABLE_CELL_CHARS = 60


def write_rows(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str], fmt: str, stream: TextIO
) -> None:
    if fmt == "json":
        records = [{column: row.get(column) for column in columns} for row in rows]
        json.dump(records, stream, ensure_ascii=False, indent=2)
        stream.write("\n")
    elif fmt == "csv":
        writer = csv.DictWriter(stream, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({column: _csv_cell(row.get(column)) for column in columns})
    elif fmt == "table":
        _write_table(rows, columns, stream)
    else:
        raise ValueError(f"unknown format {fmt!r}; one of {FORMATS}")


def _csv_cell(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return " ".join(map(str, value))
    return value


def _table_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        value = " ".join(map(str, value))
    text = " ".join(str(value).split())
    return text if len(text) <= TABLE_CELL_CHARS else text[: TABLE_CELL_CHARS - 1] + "…"


def _write_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], stream: TextIO):
    cells = [[_table_cell(row.get(column)) for column in columns] for row in rows]
    widths = [
        max([len(column), *(len(line[index]) for line in cells)])
        for index, column in enumerate(columns)
    ]
    lines = [columns, ["-" * width for width in widths], *cells]
    for line in lines:
        stream.write(
            "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        )
        stream.write("\n")
    if not rows:
        stream.write("(no rows)\n")
