"""Screen rectangles and the cell grids that capture and encoder cut them into."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

Area = tuple[int, int, int, int]  # rows [r0, r1) x columns [c0, c1) of a grid's cells


@dataclass(frozen=True)
class Rect:
    x: int
    y: int
    width: int
    height: int

    def clip(self, width: int, height: int) -> Rect | None:
        x0, y0 = max(self.x, 0), max(self.y, 0)
        x1, y1 = min(self.x + self.width, width), min(self.y + self.height, height)
        if x1 <= x0 or y1 <= y0:
            return None
        return Rect(x0, y0, x1 - x0, y1 - y0)

    def overlaps(self, other: Rect) -> bool:
        return (self.x < other.x + other.width and other.x < self.x + self.width
                and self.y < other.y + other.height and other.y < self.y + self.height)


def bounding(rects: Iterable[Rect]) -> Rect:
    rects = list(rects)
    x0 = min(r.x for r in rects)
    y0 = min(r.y for r in rects)
    x1 = max(r.x + r.width for r in rects)
    y1 = max(r.y + r.height for r in rects)
    return Rect(x0, y0, x1 - x0, y1 - y0)


def row_spans(rects: list[Rect], height: int) -> list[tuple[int, int]]:
    """Merge the rows covered by rects into sorted, non-overlapping [y0, y1) spans."""
    spans = sorted((max(r.y, 0), min(r.y + r.height, height)) for r in rects)
    merged: list[tuple[int, int]] = []
    for y0, y1 in spans:
        if y1 <= y0:
            continue
        if merged and y0 <= merged[-1][1]:
            if y1 > merged[-1][1]:
                merged[-1] = (merged[-1][0], y1)
        else:
            merged.append((y0, y1))
    return merged


class Grid:
    """Cells of cell_width x cell_height pixels over a width x height screen."""

    def __init__(self, width: int, height: int, cell_width: int, cell_height: int) -> None:
        self.width, self.height = width, height
        self.cell_width, self.cell_height = cell_width, cell_height
        self.rows = (height + cell_height - 1) // cell_height
        self.columns = (width + cell_width - 1) // cell_width

    @property
    def count(self) -> int:
        return self.rows * self.columns

    def cells(self, rects: Iterable[Rect]) -> dict[int, list[int]]:
        """row -> sorted columns of the cells that any rect touches."""
        cells: dict[int, set[int]] = {}
        for r in rects:
            x0, y0 = max(r.x, 0), max(r.y, 0)
            x1, y1 = min(r.x + r.width, self.width), min(r.y + r.height, self.height)
            if x1 <= x0 or y1 <= y0:
                continue
            columns = range(x0 // self.cell_width, (x1 - 1) // self.cell_width + 1)
            for row in range(y0 // self.cell_height, (y1 - 1) // self.cell_height + 1):
                cells.setdefault(row, set()).update(columns)
        return {row: sorted(columns) for row, columns in sorted(cells.items())}

    def rect(self, area: Area) -> Rect:
        """The pixels of an area of cells, clipped to the screen."""
        r0, r1, c0, c1 = area
        x0, y0 = c0 * self.cell_width, r0 * self.cell_height
        return Rect(x0, y0, min(c1 * self.cell_width, self.width) - x0,
                    min(r1 * self.cell_height, self.height) - y0)


def runs(indices: list[int]) -> list[tuple[int, int]]:
    """Sorted indices as [start, end) runs of consecutive ones."""
    out: list[tuple[int, int]] = []
    for i in indices:
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


def areas(cells: dict[int, list[int]]) -> list[Area]:
    """Rectangles covering exactly the given cells: each row's runs of columns, with the same run
    in consecutive rows merged into one rectangle."""
    out: list[Area] = []
    open_runs: dict[tuple[int, int], int] = {}  # run -> first row
    prev = -2
    for row in sorted(cells):
        still: dict[tuple[int, int], int] = {}
        for run in runs(cells[row]):
            start = open_runs.pop(run, None) if row == prev + 1 else None
            still[run] = row if start is None else start
        out.extend((start, prev + 1, *run) for run, start in open_runs.items())
        open_runs, prev = still, row
    out.extend((start, prev + 1, *run) for run, start in open_runs.items())
    return out


def spans(cells: dict[int, list[int]]) -> dict[int, list[int]]:
    """Each row's cells widened to one run from its first to its last: fewer, larger areas."""
    return {row: list(range(c[0], c[-1] + 1)) for row, c in cells.items()}
