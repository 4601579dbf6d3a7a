"""The one table renderer: plain text for terminals, Markdown for report files, HTML (escaped)
for report pages."""
from __future__ import annotations

from tabulate import tabulate


def table(rows: list[list], headers: list[str], *, markdown: bool = False, fmt: str | None = None,
          indent: str = "") -> str:
    """Rows under headers; numbers are shown as given (format them before). ``fmt="html"``
    escapes every cell."""
    text = tabulate(rows, headers=headers, tablefmt=fmt or ("github" if markdown else "simple"), disable_numparse=True)
    return "\n".join(indent + line for line in text.splitlines())
