"""The one table renderer: plain text for terminals, Markdown for report files, HTML (escaped)
for report pages. Numbers are kept at full precision in data (JSON, CSV) and rounded only here,
where text is displayed (``num``)."""
from __future__ import annotations

from tabulate import tabulate


def num(value, sig: int = 4) -> str:
    """A number for display: ``sig`` significant figures, no exponent for everyday magnitudes
    (0.2406, 6.158, 175.7, 2214); "-" for None; anything else as str."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int) or value != value or value in (float("inf"), float("-inf")):
        return str(value)
    if value == 0:
        return "0"
    if abs(value) >= 10 ** (sig - 1):
        return f"{value:.0f}"
    if abs(value) < 1e-4:
        return f"{value:.{sig - 1}e}"
    text = f"{value:.{sig}g}"
    return text if "e" not in text else f"{value:f}".rstrip("0").rstrip(".")


def pct(value, digits: int = 2) -> str:
    """A percentage for display ("76.35 %"); "n/a" for None."""
    return "n/a" if value is None else f"{value:.{digits}f} %"


def table(rows: list[list], headers: list[str], *, markdown: bool = False, fmt: str | None = None,
          indent: str = "") -> str:
    """Rows under headers; a float cell is shown with ``num`` (format it before for another
    display), None as "-", booleans as yes/no. ``fmt="html"`` escapes every cell."""
    def cell(v):
        if isinstance(v, bool):
            return "yes" if v else "no"
        return num(v) if isinstance(v, float) or v is None else v

    text = tabulate([[cell(v) for v in row] for row in rows], headers=headers,
                    tablefmt=fmt or ("github" if markdown else "simple"), disable_numparse=True)
    return "\n".join(indent + line for line in text.splitlines())
