"""The one exception type a user can cause; the CLI prints its message as one line and exits 2."""


class DfkdError(Exception):
    """An error caused by the user's input, with a message that names the problem and the fix."""


class TooCostly(DfkdError):
    """A job estimated to run longer on a CPU than the caller allows: it needs the user's yes."""


def first_line(exc: BaseException) -> str:
    """The first line of `exc`'s message, or its type's name when it has none: what a one-line error quotes
    of a library's (often multi-line) exception."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
