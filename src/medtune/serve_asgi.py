"""The HTTP plumbing of ``medtune.serve``: the micro-batcher that groups concurrent requests'
notes into one ``predict_texts`` call, and the ASGI guard (bearer token, body limit, security
headers, an access log without bodies). See ``medtune.serve`` for the routes."""

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("medtune.serve")
PUBLIC = frozenset({"/", "/healthz", "/readyz"})
ROUTES = frozenset({*PUBLIC, "/v1/labels", "/v1/predict", "/docs", "/openapi.json", "/redoc"})


# ----------------------------------------------------------------------------- batching
@dataclass
class _Job:
    texts: list[str]
    future: asyncio.Future = field(repr=False)


class MicroBatcher:
    """Collects the notes of concurrent requests into batches for one predict function."""

    def __init__(self, predict: Callable[[list[str]], list[dict[str, Any]]], *,
                 executor: ThreadPoolExecutor, window_ms: float = 5, max_size: int = 32):
        self.predict = predict
        self.executor = executor
        self.window = window_ms / 1000
        self.max_size = max(1, max_size)
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self.batches = 0  # predict calls made (tests and the load test read it)

    async def submit(self, texts: list[str]) -> list[dict[str, Any]]:
        job = _Job(texts, asyncio.get_running_loop().create_future())
        await self.queue.put(job)
        return await job.future

    async def _collect(self, first: _Job) -> tuple[list[_Job], _Job | None]:
        """``first`` plus the jobs that arrive within the window and fit in max_size; a job that
        does not fit is carried over to the next batch."""
        loop = asyncio.get_running_loop()
        batch, n = [first], len(first.texts)
        deadline = loop.time() + self.window
        while n < self.max_size:
            remaining = deadline - loop.time()
            try:
                job = self.queue.get_nowait() if remaining <= 0 else \
                    await asyncio.wait_for(self.queue.get(), remaining)
            except (TimeoutError, asyncio.QueueEmpty):
                break
            if n + len(job.texts) > self.max_size:
                return batch, job
            batch.append(job)
            n += len(job.texts)
        return batch, None

    async def run(self) -> None:
        carry: _Job | None = None
        while True:
            first = carry or await self.queue.get()
            batch, carry = await self._collect(first)
            await self._predict([job for job in batch if not job.future.done()])  # (client left)

    async def _predict(self, batch: list[_Job]) -> None:
        if not batch:
            return
        texts = [t for job in batch for t in job.texts]
        try:
            rows = await asyncio.get_running_loop().run_in_executor(self.executor, self.predict, texts)
            if len(rows) != len(texts):
                raise RuntimeError(f"{len(rows)} predictions for {len(texts)} notes")
        except Exception as exc:
            if len(batch) > 1:  # whose notes failed? each request alone, the others still answered
                for job in batch:
                    await self._predict([job])
                return
            log.error("prediction failed: %s", type(exc).__name__)
            if not batch[0].future.done():
                batch[0].future.set_exception(exc)
            return
        self.batches += 1
        start = 0
        for job in batch:
            if not job.future.done():
                job.future.set_result(rows[start:start + len(job.texts)])
            start += len(job.texts)


# ----------------------------------------------------------------------------- guard
async def _send_json(send, status: int, body: dict[str, Any],
                     headers: dict[str, str] | None = None) -> None:
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


class Guard:
    """ASGI middleware: bearer token, body size limit, security headers and an access log that
    records method, route, status and latency only (never bodies or query strings)."""

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int):
        self.app = app
        self.api_key = api_key.strip().encode() if api_key else None
        self.max_body = max_body_bytes

    def _authorized(self, scope) -> bool:
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(),
                                                                           self.api_key)
        return False

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        path = scope.get("path", "")
        status = [500]

        async def send_logged(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [*message.get("headers", []),
                                      (b"x-content-type-options", b"nosniff"),
                                      (b"referrer-policy", b"no-referrer")]
            await send(message)

        try:
            if await self._handle(scope, receive, send_logged, path) == "gone":
                status[0] = 499  # the client closed the connection mid-request (not a 5xx)
        finally:
            log.info("%s %s %d %.1fms", scope.get("method", "-"),
                     path if path in ROUTES else "<other>", status[0],
                     (time.perf_counter() - start) * 1000)

    async def _handle(self, scope, receive, send, path: str) -> str | None:
        if self.api_key and path not in PUBLIC and not self._authorized(scope):
            await _send_json(send, 401, {"detail": "missing or invalid API key "
                                         "(send 'Authorization: Bearer <key>')"},
                             {"www-authenticate": "Bearer"})
            return None
        too_big = {"detail": f"request body larger than {self.max_body} bytes"}
        headers = dict(scope.get("headers", []))
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body:
            await _send_json(send, 413, too_big)
            return None
        kind = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if scope.get("method") == "POST" and kind not in (b"application/json", b"") \
                and not kind.endswith(b"+json"):
            await _send_json(send, 415, {"detail": f"send JSON (content-type: application/json), "
                                         f"not {kind.decode('latin-1')[:60]}"})
            return None
        chunks, size, more = [], 0, True
        while more:  # read the whole (bounded) body first, then replay it to the app
            message = await receive()
            if message["type"] == "http.disconnect":
                return "gone"
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                await _send_json(send, 413, too_big)
                return None
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
        return None
