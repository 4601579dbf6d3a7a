"""The one table renderer: plain text for terminals, Markdown for report files."""
from __future__ import annotations

from tabulate import tabulate


def table(rows: list[list], headers: list[str], *, markdown: bool = False, indent: str = "") -> str:
    """Rows under headers; numbers are shown as given (format them before)."""
    text = tabulate(rows, headers=headers, tablefmt="github" if markdown else "simple", disable_numparse=True)
    return "\n".join(indent + line for line in text.splitlines())
