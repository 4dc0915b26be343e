"""Reading the CSV file: checked as a whole first, then parsed into chunks of rows.

The file is checked as a whole first (size, UTF-8), so a broken file writes
nothing. Rows are validated (``importer.rows``) and de-duplicated here; bad rows
and duplicates are counted in the report before anything reaches SQL.
"""

from __future__ import annotations

import codecs
import csv
from collections.abc import Callable, Iterator
from pathlib import Path

from mailer.csvsafe import restore
from mailer.importer.report import Chunk, ImportFileError, Report
from mailer.importer.rows import EmailNormalizer, ImportOptions, Row, parse_row
from mailer.subscriptions import InvalidInput

MAX_FILE_BYTES = 200 * 1024 * 1024
MAX_FILE_LABEL = "200 MB"
CHUNK_ROWS = 1000


def check_file(path: Path) -> int:
    """Refuse a file that is missing, too large or not UTF-8; return its line count."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImportFileError(f"{path}: no such file") from None
    if not path.is_file():
        raise ImportFileError(f"{path}: not a regular file")
    if size > MAX_FILE_BYTES:
        raise ImportFileError(
            f"{path}: {size / 1e6:.0f} MB is over the {MAX_FILE_LABEL} import limit; "
            "split the file and import the parts"
        )
    decoder = codecs.getincrementaldecoder("utf-8")()
    lines, last = 0, b"\n"
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            last = block[-1:]
            try:
                decoder.decode(block)
            except UnicodeDecodeError:
                raise ImportFileError(
                    f"{path}: line {_bad_utf8_line(path)} is not UTF-8 text; save the file "
                    "as UTF-8 CSV"
                ) from None
            lines += block.count(b"\n")
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise ImportFileError(f"{path}: not UTF-8 text (truncated at the end)") from None
    return lines + (last != b"\n")


def _bad_utf8_line(path: Path) -> int:
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return 0


def _getter(header: dict[str, int], record: list[str]) -> Callable[[str], str]:
    def get(column: str) -> str:
        i = header.get(column)
        # restore(): our export's guard against spreadsheet formulas, taken off again.
        return restore(record[i]) if i is not None and i < len(record) else ""

    return get


def read_chunks(path: Path, opts: ImportOptions, report: Report) -> Iterator[Chunk]:
    """Parse, validate and de-duplicate; bad rows and duplicates are counted here."""
    csv.field_size_limit(max(csv.field_size_limit(), MAX_FILE_BYTES))  # lengths checked per field
    seen: set[str] = set()
    email_of = EmailNormalizer()
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh)
        header: dict[str, int] | None = None
        rows: dict[str, Row] = {}
        late: list[Row] = []
        last = 0
        for record in reader:
            line, last = last + 1, reader.line_num
            if not any(v.strip() for v in record):
                continue  # blank lines are not rows
            if header is None:
                header = {}
                for i, col in enumerate(record):
                    header.setdefault(col.strip().lower(), i)
                if "email" not in header:
                    found = ", ".join(c for c in header if c) or "nothing"
                    raise ImportFileError(
                        f"{path}: no 'email' column in the header (found {found})"
                    )
                continue
            report.read += 1
            try:
                row = parse_row(line, _getter(header, record), opts, email_of)
            except InvalidInput as exc:
                report.bad += 1
                report.note(line, f"bad: {exc.field}: {exc.message}")
                continue
            if row.email in seen:
                report.duplicates += 1
                first = rows.get(row.email)
                if first is None:
                    late.append(row)
                elif first.name is None:
                    first.name = row.name
                continue
            seen.add(row.email)
            rows[row.email] = row
            if len(rows) + len(late) >= CHUNK_ROWS:
                yield Chunk(list(rows.values()), last, late)
                rows, late = {}, []
        if header is None:
            raise ImportFileError(f"{path}: empty file (expected a header line with 'email')")
        if rows or late or report.read:
            yield Chunk(list(rows.values()), last, late)
