"""The one error type a user can fix: bad options, missing files, mismatched checkpoints.

The command line prints these as a single line and exits non-zero; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Iterator


class TrainingError(ValueError):
    """A problem with the user's request (options, data files, devices, checkpoints)."""


def causes(error: BaseException) -> Iterator[BaseException]:
    """``error``, then the exceptions it was raised from or while handling
    (``__cause__``, else ``__context__``), innermost last, each once: where the root
    cause of a wrapped failure (an OSError, a JAX runtime error) is found."""
    seen, cur = set(), error
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__
