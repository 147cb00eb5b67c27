"""The HTTP server: OpenAI-compatible `/v1/models` and `/v1/chat/completions`, and a chat page.

The model runs in one worker thread, so requests take turns (FIFO) and the event loop stays free
to stream. A streaming request whose client disconnects is cancelled (Starlette cancels the
response task; our `finally` sets the generation's cancel flag); a non-streaming one is watched
with `request.is_disconnected()`. Every error is an OpenAI-style JSON body, never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from importlib.resources import files
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from crucible.serve.api import (
    ApiError,
    chunk_body,
    completion_body,
    new_id,
    parse_request,
    usage_chunk_body,
    validation_error,
)
from crucible.serve.engine import ChatEngine, ChatEvent, Prepared, PromptTooLong, Sampling

_END = object()


def _error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(engine: ChatEngine, model_name: str, thinking_default: bool = True) -> FastAPI:
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="crucible-generate")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="crucible serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(validation_error(list(exc.errors())))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return _error_response(ApiError(exc.status_code, str(exc.detail), code=code))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        msg = f"internal error: {type(exc).__name__}: {exc}"
        return _error_response(ApiError(500, msg, type="server_error"))

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "crucible"}

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return (files("crucible.serve") / "static" / "index.html").read_text(encoding="utf-8")

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        if model_id != model_name:
            raise _unknown_model(model_id)
        return model_card()

    def _unknown_model(name: str) -> ApiError:
        return ApiError(
            404,
            f"the model {name!r} does not exist; this server serves {model_name!r}",
            param="model",
            code="model_not_found",
        )

    async def events(
        prepared: Prepared, sampling: Sampling, cancel: threading.Event
    ) -> AsyncIterator[ChatEvent]:
        """Run the generation in the worker thread; hand its events to the event loop."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()

        def put(item: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening
                loop.call_soon_threadsafe(queue.put_nowait, item)

        def work() -> None:
            try:
                if not cancel.is_set():
                    for event in engine.stream(prepared, sampling, cancel):
                        put(event)
            except Exception as e:  # reported to the request, never kills the worker
                put(e)
            finally:
                put(_END)

        loop.run_in_executor(executor, work)
        try:
            while (item := await queue.get()) is not _END:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            cancel.set()  # a no-op when finished; stops the generation when the client left

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body = parse_request(await request.body())
        if body.model != model_name:
            raise _unknown_model(body.model)
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        try:
            prepared = engine.prepare(messages, body.thinking(thinking_default), body.limit())
        except PromptTooLong as e:
            raise ApiError(400, str(e), param="messages", code="context_length_exceeded") from e
        except ValueError as e:
            raise ApiError(400, str(e), param="messages") from e
        sampling = Sampling(
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=body.top_k or None,
            seed=body.seed,
        )
        cancel = threading.Event()
        cid = new_id()
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            stream = _sse_stream(cid, events(prepared, sampling, cancel), include_usage)
            return StreamingResponse(
                stream,
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )

        async def watch_disconnect() -> None:
            while not cancel.is_set():
                if await request.is_disconnected():
                    cancel.set()
                    return
                await asyncio.sleep(0.1)

        watcher = asyncio.create_task(watch_disconnect())
        reasoning, content, last = "", "", ChatEvent()
        try:
            async for event in events(prepared, sampling, cancel):
                reasoning, content, last = (
                    reasoning + event.reasoning,
                    content + event.content,
                    event,
                )
        finally:
            watcher.cancel()
        return completion_body(cid, model_name, reasoning, content, _public(last))

    async def _sse_stream(
        cid: str, source: AsyncIterator[ChatEvent], include_usage: bool
    ) -> AsyncIterator[str]:
        now = int(time.time())
        yield _sse(chunk_body(cid, model_name, now, {"role": "assistant", "content": ""}))
        try:
            async for event in source:
                delta: dict[str, Any] = {}
                if event.reasoning:
                    delta["reasoning_content"] = event.reasoning
                if event.content:
                    delta["content"] = event.content
                if delta:
                    yield _sse(chunk_body(cid, model_name, now, delta))
                if event.finish_reason is not None:
                    last = _public(event)
                    yield _sse(chunk_body(cid, model_name, now, {}, last.finish_reason))
                    if include_usage:
                        yield _sse(usage_chunk_body(cid, model_name, now, last))
        except Exception as e:  # headers are sent: report in-band, as OpenAI does
            yield _sse(ApiError(500, f"generation failed: {e}", type="server_error").body())
        yield "data: [DONE]\n\n"

    return app


def _public(event: ChatEvent) -> ChatEvent:
    """OpenAI knows only "stop" and "length"; a cancelled request has no reader anyway."""
    if event.finish_reason == "cancelled":
        event.finish_reason = "stop"
    return event


def serve(engine: ChatEngine, model_name: str, host: str, port: int, thinking: bool) -> None:
    import uvicorn

    app = create_app(engine, model_name, thinking_default=thinking)
    print(f"crucible serve: {model_name} on http://{host}:{port}/ (chat page) and /v1 (API)")
    uvicorn.run(app, host=host, port=port, log_level="info")
