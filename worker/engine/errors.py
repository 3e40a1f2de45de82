"""One line that says what went wrong, for error rows and error messages.

Examples:
    >>> describe_error(ValueError("bad shape\\n  more detail"))
    'ValueError: bad shape'
"""

from __future__ import annotations

_NOISE = ("Graph execution error", "Detected at node", "Traceback", "File ", "[[")


def describe_error(exc: BaseException, limit: int = 400) -> str:
    """``Type: cause`` of an exception.  TensorFlow's runtime errors start with 'Graph execution error:' and a
    traceback of where the op was defined; the cause (an assertion's message, an op's complaint) is the first
    unindented line after them."""
    for line in str(exc).splitlines():
        if line.strip() and not line.startswith((" ", "\t")) and not line.strip().startswith(_NOISE):
            return f"{type(exc).__name__}: {line.strip()[:limit]}"
    return repr(exc)[:limit]
