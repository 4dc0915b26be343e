"""What an import did, line by line and in totals: the report the operator reads."""

from __future__ import annotations

from dataclasses import dataclass, field

from mailer.errors import MailerError
from mailer.importer.rows import Row

# Every problem line is printed, up to this many; a file of garbage should not flood a terminal.
MAX_NOTES = 10_000


class ImportFileError(MailerError):
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
