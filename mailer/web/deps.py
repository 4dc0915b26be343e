"""What the web routers share: editor authentication, path types, error answers, test sends.

Routers never import each other; whatever two of them need lives here. Domain code
raises ``mailer.errors`` classes and never picks an HTTP status: ``STATUS_FOR`` is
the one map from those to 404/409/422.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import Depends, Path, Query, Request
from fastapi.responses import Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from mailer.editors import authenticate, well_formed
from mailer.errors import Conflict, Invalid, MailerError, NotFound
from mailer.models import Editor, Statement
from mailer.render import StatementContent, make_message_id
from mailer.smtp import SendError, SmtpPool
from mailer.web.context import MAX_SQL_INT, AppContext, get_ctx

# The one map from domain errors to HTTP statuses; the domain never picks a status.
STATUS_FOR: dict[type[MailerError], int] = {NotFound: 404, Conflict: 409, Invalid: 422}


def status_for(exc: MailerError) -> int:
    """The HTTP status for a domain error: that of its nearest mapped class, else 400."""
    for cls in type(exc).__mro__:
        if cls in STATUS_FOR:
            return STATUS_FOR[cls]
    return 400


class ApiError(Exception):
    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers


PROBLEM_SCHEMA = {
    "type": "object",
    "properties": {"detail": {"type": "string", "description": "what is wrong, in one line"}},
    "required": ["detail"],
}


def problem(description: str) -> dict[str, Any]:
    """An error answer for the OpenAPI document: JSON ``{"detail": …}``, also on HTML routes."""
    return {"description": description, "content": {"application/json": {"schema": PROBLEM_SCHEMA}}}


# Declared so the OpenAPI document says how to authenticate; the check itself is below.
_bearer = HTTPBearer(auto_error=False, description="an editor token from `mailer editors add`")


async def authenticate_bearer(request: Request) -> Editor:
    """A token that cannot be one is refused before any query; the lookup only reads, so
    a flood of junk tokens never takes (or waits for) SQLite's write lock."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "missing bearer token", {"WWW-Authenticate": "Bearer"})
    if not well_formed(token.strip()):
        raise ApiError(403, "invalid editor token")
    ctx = get_ctx(request)
    async with ctx.runtime.reads() as session:
        editor = await authenticate(session, token.strip())
    if editor is None:
        raise ApiError(403, "invalid editor token")
    return editor


async def current_editor(
    request: Request,
    _declared: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)] = None,
) -> Editor:
    """The editor ``EditorRoute`` already checked (or checked now, for other routers)."""
    editor = getattr(request.state, "editor", None)
    return editor if isinstance(editor, Editor) else await authenticate_bearer(request)


class EditorRoute(APIRoute):
    """Authenticates before FastAPI reads the body: a request without a valid token gets
    401/403 whatever it carries, and nothing it sent is parsed."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def run(request: Request) -> Response:
            request.state.editor = await authenticate_bearer(request)
            return await handler(request)

        return run


EditorDep = Annotated[Editor, Depends(current_editor)]
EDITOR_ERRORS: dict[int | str, dict[str, Any]] = {
    401: problem("no bearer token"),
    403: problem("the token is not a valid editor token"),
    413: problem("the request body is larger than MAILER_MAX_BODY_BYTES"),
    422: problem("invalid input; the detail names the field and the problem"),
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: problem("no such record")}
# Path ids and offsets beyond what SQL can hold are refused as input, never passed on.
# The example (ids start at 1) is also what API fuzzers try first, so a fuzz run always
# reaches the handlers with a row that exists, not only the 404 (tests/test_schema_fuzz.py).
FIRST_ID = {"first": {"summary": "the first row", "value": 1}}
StatementId = Annotated[int, Path(ge=1, le=MAX_SQL_INT, openapi_examples=FIRST_ID)]
BlastId = Annotated[int, Path(ge=1, le=MAX_SQL_INT, openapi_examples=FIRST_ID)]
SubscriberId = Annotated[int, Path(ge=1, le=MAX_SQL_INT, openapi_examples=FIRST_ID)]
Offset = Annotated[int, Query(ge=0, le=MAX_SQL_INT)]


async def send_test_copies(
    ctx: AppContext, statement: Statement, recipients: list[str]
) -> dict[str, str]:
    """Shared by the API and the admin UI, so a test copy is the same message either way.

    Sent at once on a private connection, bypassing queue and throttle: an editor is
    waiting for it. A refused address is a result; SmtpConfigError means the relay
    itself is unusable. ``recipients`` must already be normalized.
    """
    settings = ctx.runtime.settings
    compiled = ctx.renderer.compile_statement(
        StatementContent.from_model(statement), blast_id=None, test=True
    )
    pool = SmtpPool(settings, size=1)
    results: dict[str, str] = {}
    try:
        for to in recipients:
            data_bytes = compiled.build(
                to=to,
                unsubscribe_url=f"{settings.base_url}/unsubscribe/test-copy",
                message_id=make_message_id(settings, None, None),
            )
            try:
                await pool.send(settings.from_address, to, data_bytes)
                results[to] = "sent"
            except SendError as exc:
                results[to] = f"refused: {exc}"
    finally:
        await pool.close()
    return results
