"""Bulk import of subscribers from CSV: merge, never duplicate; report every row.

The file is checked as a whole first (size, UTF-8), so a broken file writes
nothing. Then rows go to SQL in chunks, one transaction each: a crash leaves
whole chunks, and running the same file again finds those rows existing and
changes nothing. An import only ever adds consent, never removes it: an
address that left (or was erased) is not brought back by an old list; the report
counts those rows as "left" (docs/security.md).
"""

from __future__ import annotations

import codecs
import csv
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.exc import IntegrityError

from mailer.config import Settings
from mailer.csvsafe import restore
from mailer.import_merge import apply_chunk
from mailer.import_rows import EmailNormalizer, ImportOptions, Row, parse_row
from mailer.runtime import Runtime
from mailer.subscriptions import InvalidInput
from mailer.worker import Queue

MAX_FILE_BYTES = 200 * 1024 * 1024
MAX_FILE_LABEL = "200 MB"
CHUNK_ROWS = 1000
# Every problem line is printed, up to this many; a file of garbage should not flood a terminal.
MAX_NOTES = 10_000


class ImportFileError(Exception):
    """The file as a whole cannot be imported; the message is one line for the operator."""


@dataclass
class Report:
    read: int = 0
    imported: int = 0
    updated: int = 0
    duplicates: int = 0
    existing: int = 0
    suppressed: int = 0
    # Rows of people who left (unsubscribed, bounced, erased): never made confirmed.
    left: int = 0
    bad: int = 0
    queued: int = 0
    dry_run: bool = False
    notes: list[tuple[int, str]] = field(default_factory=list)
    notes_left_off: int = 0

    def merge(self, other: Report) -> None:
        """Add the counts of one chunk, once its transaction committed."""
        for name in ("read", "imported", "updated", "duplicates", "existing", "suppressed",
                     "left", "bad", "queued"):  # fmt: skip
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for line, message in other.notes:
            self.note(line, message)
        self.notes_left_off += other.notes_left_off

    def note(self, line: int, message: str) -> None:
        if len(self.notes) < MAX_NOTES:
            self.notes.append((line, message))
        else:
            self.notes_left_off += 1

    @property
    def balanced(self) -> bool:
        parts = self.imported + self.updated + self.duplicates + self.existing
        return parts + self.suppressed + self.left + self.bad == self.read

    def lines(self) -> list[str]:
        out = [f"line {line}: {message}" for line, message in sorted(self.notes)]
        if self.notes_left_off:
            out.append(f"… and {self.notes_left_off} more lines with problems not shown")
        if self.dry_run:
            out.append("dry run: nothing was written and no mail was queued")
        out += [
            f"read: {self.read}",
            f"imported (new): {self.imported}",
            f"updated: {self.updated}",
            f"duplicates merged: {self.duplicates}",
            f"skipped existing: {self.existing}",
            f"suppressed: {self.suppressed}",
            f"left earlier (not brought back): {self.left}",
            f"bad: {self.bad}",
            f"confirmation mails queued: {self.queued}",
        ]
        return out


@dataclass
class Chunk:
    rows: list[Row]
    last_line: int
    # Repeats of addresses first seen in an earlier chunk: they may only fill in a name.
    late_duplicates: list[Row]


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


async def _apply_with_retry(
    runtime: Runtime, chunk: Chunk, opts: ImportOptions, report: Report
) -> list[int]:
    """Retry a chunk that lost a race with a sign-up of one of its addresses (unique email)."""
    for attempt in range(3):
        delta = Report()
        try:
            queued = await apply_chunk(runtime, chunk, opts, delta)
        except IntegrityError:
            if attempt == 2:
                raise
            continue
        report.merge(delta)
        return queued
    raise AssertionError("unreachable")  # pragma: no cover


async def _enqueue(runtime: Runtime, queue: Queue, ids: list[int]) -> None:
    """Queue the chunk's confirmation mails in one Redis round trip.

    Only after the chunk committed: a job that ran first would find no pending row.
    """
    stamp = int(time.time())
    await queue.confirmations([(i, runtime.keys.confirm_job_id(i, stamp)) for i in ids])


async def import_csv(
    settings: Settings,
    path: Path,
    opts: ImportOptions,
    progress: Callable[[int, int], None] | None = None,
) -> Report:
    """Import a CSV file; ``progress(line, total_lines)`` follows the rows as they commit."""
    total = check_file(path)
    report = Report(dry_run=opts.dry_run)
    runtime = Runtime.create(settings)
    queue = None
    try:
        if not opts.dry_run:
            queue = await Queue.connect(settings)  # fail before writing, not after
        for chunk in read_chunks(path, opts, report):
            queued = await _apply_with_retry(runtime, chunk, opts, report)
            if queue is not None and queued:
                await _enqueue(runtime, queue, queued)
                report.queued += len(queued)
            if progress is not None:
                progress(chunk.last_line, total)
    finally:
        if queue is not None:
            await queue.close()
        await runtime.close()
    return report


__all__ = ["ImportFileError", "ImportOptions", "Report", "check_file", "import_csv", "read_chunks"]
