"""WSGI plumbing shared by the wrappers around moto's server apps (S3, SQS, EventBridge)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

StartResponse = Any


class FailedBeforeAnswering(Exception):
    """The wrapped app raised before it started a response (the cause is chained)."""


def answer_of(
    app: Callable[[dict[str, Any], StartResponse], Iterable[bytes]],
    environ: dict[str, Any],
    start_response: StartResponse,
) -> tuple[int, bytes]:
    """Run a WSGI app to the end: its response is started on ``start_response``, its body collected.

    :param app: the wrapped app.
    :param environ: the WSGI environ.
    :param start_response: the server's start_response.
    :return: the HTTP status the app answered and its whole body.
    :raises FailedBeforeAnswering: when the app raised before starting a response (the caller may still answer).
    """
    status: list[int] = []

    def capture(status_line: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        status.append(int(status_line.split(" ", 1)[0]))
        return start_response(status_line, headers, exc_info)

    try:
        result = app(environ, capture)
    except Exception as error:
        if status:
            raise
        raise FailedBeforeAnswering(type(error).__name__) from error
    try:
        body = b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return status[0] if status else 500, body
