"""Bulk import of subscribers from CSV: merge, never duplicate; report every row.

The file is checked as a whole first (``csvfile``), so a broken file writes
nothing. Then rows (``rows``) go to SQL in chunks (``merge``), one transaction
each (``run``): a crash leaves whole chunks, and running the same file again
finds those rows existing and changes nothing. An import only ever adds consent,
never removes it: an address that left (or was erased) is not brought back by an
old list (docs/design.md, invariant 9).
"""

from mailer.importer.csvfile import MAX_FILE_BYTES, check_file, read_chunks
from mailer.importer.report import ImportFileError, Report
from mailer.importer.rows import EmailNormalizer, ImportOptions
from mailer.importer.run import import_csv

__all__ = [
    "MAX_FILE_BYTES",
    "EmailNormalizer",
    "ImportFileError",
    "ImportOptions",
    "Report",
    "check_file",
    "import_csv",
    "read_chunks",
]
