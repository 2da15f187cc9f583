"""Errors as the caller sees them: OpenAI's shape (`{"error": {message, type, param, code}}`) with `param`
naming the field at fault, a 4xx for anything the caller sent wrong, 429 + Retry-After for a job shed at
submit (`Overloaded`), 503 + Retry-After while Redis cannot serve, and 500 only for a bug here."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from broker.client import redis_unavailable
from broker.errors import Overloaded, RedisUnavailable

log = logging.getLogger(__name__)
OPENAI_PATHS = ("/v1/chat/", "/v1/images/")   # OpenAI answers 400 to every invalid request; FastAPI says 422
RETRY_AFTER_S = 2


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 headers: dict[str, str] | None = None, fields: Sequence[dict[str, Any]] | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers, self.fields = headers or {}, list(fields or [])


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None,
               fields: Iterable[dict[str, Any]] = ()) -> dict[str, Any]:
    body: dict[str, Any] = {"message": message, "type": kind, "param": param, "code": code}
    listed = [{"loc": [str(x) for x in f.get("loc", ())] or ["body"], "msg": str(f.get("msg", ""))} for f in fields]
    if listed:
        body["fields"] = listed
    return {"error": body}


def error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(error_body(exc.message, exc.kind, exc.param, exc.code, exc.fields), status_code=exc.status,
                        headers=exc.headers)


def param_of(errors: Sequence[dict[str, Any]], fields: Iterable[str] = ()) -> str | None:
    """The field a list of pydantic errors is about: the first error's location (without the `body`
    prefix), or — for a whole-object check such as "steps 300 is over the limit" — the field its message
    starts with."""
    for e in errors:
        loc = [str(x) for x in e.get("loc", ())]
        if loc and loc[0] in ("body", "header", "query", "path"):
            loc = loc[1:]
        if loc:
            return ".".join(loc)
        word = re.match(r"(?:Value error, )?([a-z_]+)", str(e.get("msg", "")))
        if word and word.group(1) in set(fields):
            return word.group(1)
    return None


def request_words(message: str, names: dict[str, str], param: str | None) -> str:
    """A job's validation message in the words of the request it came from: each job field renamed to the one
    request field it came from (`max_new_tokens` → `max_tokens`, `prompt` → `messages`); one that several job
    fields come from (`size`: width and height) is named in front instead."""
    for job_field, asked in names.items():
        if job_field != asked and list(names.values()).count(asked) == 1:
            message = re.sub(rf"\b{re.escape(job_field)}\b", asked, message)
    if param and not re.search(rf"\b{re.escape(param)}\b", message):
        message = f"{param}: {message}"
    return message


def _describe(e: dict[str, Any]) -> str:
    loc = [str(x) for x in e.get("loc", ())]
    where = ".".join(loc[1:] if loc[:1] in (["body"], ["header"], ["query"], ["path"]) else loc)
    msg = str(e.get("msg", "")).removeprefix("Value error, ")
    return f"{where}: {msg}" if where else msg


def validation_error(path: str, errors: Sequence[dict[str, Any]]) -> ApiError:
    """A FastAPI validation failure as one ApiError: malformed JSON and a non-object body are 400; field
    errors are 422 on the native API and 400 on the OpenAI endpoints (as OpenAI answers)."""
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return ApiError(400, f"request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}",
                        code="json_invalid")
    if tuple(first.get("loc", ())) == ("body",) and first.get("type") in ("model_attributes_type", "dict_type",
                                                                          "missing"):
        got = first.get("input")
        what = ("is missing" if first.get("type") == "missing" else
                "was not read as JSON: send Content-Type: application/json" if isinstance(got, (bytes, str)) else
                f"is a JSON {type(got).__name__}")
        return ApiError(400, f"request body must be a JSON object; it {what}", code="invalid_body")
    status = 400 if path.startswith(OPENAI_PATHS) else 422
    return ApiError(status, "invalid request: " + "; ".join(_describe(e) for e in errors), param=param_of(errors),
                    fields=errors, code=str(first.get("type") or "invalid_value"))


def unavailable(exc: RedisUnavailable) -> ApiError:
    """503 with Retry-After, in the words every door uses for a Redis that cannot serve (`redis_unavailable`)."""
    return ApiError(503, str(exc), "service_unavailable", headers={"Retry-After": str(RETRY_AFTER_S)},
                    code="unavailable")


def overloaded(exc: Overloaded) -> ApiError:
    """A job shed at submit: 429 with Retry-After (whole seconds until the band's wait should be within the
    limit); `param` names the limit it was over: the job's `deadline_s` or the band's setting."""
    return ApiError(429, str(exc), "rate_limit_error", param=exc.limit, code="overloaded",
                    headers={"Retry-After": str(max(1, int(exc.retry_after_s)))})


def install(app: FastAPI) -> None:
    """Register the exception handlers on `app`."""
    from kombu.exceptions import OperationalError

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(request.url.path, list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(ApiError(exc.status_code, str(exc.detail), kind, headers=dict(exc.headers or {})))

    @app.exception_handler(redis.RedisError)
    async def _redis(_: Request, exc: redis.RedisError) -> JSONResponse:
        log.warning("redis error: %s: %s", type(exc).__name__, exc)
        return error_response(unavailable(redis_unavailable(exc)))

    @app.exception_handler(RedisUnavailable)
    async def _redis_unavailable(_: Request, exc: RedisUnavailable) -> JSONResponse:
        log.warning("%s", exc)
        return error_response(unavailable(exc))

    @app.exception_handler(Overloaded)
    async def _overloaded(_: Request, exc: Overloaded) -> JSONResponse:
        return error_response(overloaded(exc))

    @app.exception_handler(OperationalError)
    async def _broker(_: Request, exc: OperationalError) -> JSONResponse:
        log.warning("broker error: %s", exc)
        cause = exc.__cause__ if isinstance(exc.__cause__, redis.RedisError) else redis.ConnectionError(str(exc))
        return error_response(unavailable(redis_unavailable(cause)))

    @app.exception_handler(Exception)
    async def _bug(_: Request, exc: Exception) -> JSONResponse:
        log.exception("gateway error")
        return error_response(ApiError(500, f"internal error: {type(exc).__name__}", "server_error"))
