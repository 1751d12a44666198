"""Progress for long commands (model builds, publishing, benchmarks): tqdm bars on stderr, shown
only when stderr is a terminal (logs and CI output stay clean)."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


def shown() -> bool:
    return sys.stderr.isatty()


def bar(desc: str, total: int | None = None, unit: str = "it") -> Any:
    """A tqdm bar (a silent one when stderr is not a terminal): `update(n)`, `set_postfix`, `close`."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not shown(), file=sys.stderr, dynamic_ncols=True)


def steps(iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """`iterable`, with a bar while it runs."""
    from tqdm import tqdm

    yield from tqdm(iterable, desc=desc, total=total, unit=unit, disable=not shown(), file=sys.stderr, leave=False)
