"""`medtune serve`: an HTTP API (FastAPI) and a one-page web client for a trained model.

    GET  /          web page (self-contained: inline CSS/JS, no external assets)
    GET  /healthz   200 while the process is up
    GET  /readyz    200 once the model is loaded, else 503 (+ Retry-After)
    GET  /v1/labels the label set
    POST /v1/predict {"note": "..."} or {"notes": [...]}, optional "min_confidence"

Micro-batching: every request puts its notes on one queue; a single worker takes up to
``max_batch_size`` notes that arrive within ``batch_window_ms`` and runs one ``predict_texts``
call in a worker thread, then resolves each request's future. Under load, batches fill at once.

Security: bearer token (``api_key`` or $MEDTUNE_API_KEY) on every route except /, /healthz and
/readyz; body limit (413), JSON bodies only (415), note length and batch size limits (422),
concurrency limit (429), 127.0.0.1 by default. Notes are never logged: the access log holds
method, route, status and latency only (uvicorn's own access log is off).
"""

import asyncio
import contextlib
import hmac
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, model_validator

from medtune.errors import MedtuneError

log = logging.getLogger("medtune.serve")
PUBLIC = frozenset({"/", "/healthz", "/readyz"})
ROUTES = frozenset({*PUBLIC, "/v1/labels", "/v1/predict", "/docs", "/openapi.json", "/redoc"})
PAGE_CSP = ("default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
            "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'")


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
        loop = asyncio.get_running_loop()
        carry: _Job | None = None
        while True:
            first = carry or await self.queue.get()
            batch, carry = await self._collect(first)
            batch = [job for job in batch if not job.future.done()]  # client went away
            if not batch:
                continue
            texts = [t for job in batch for t in job.texts]
            try:
                rows = await loop.run_in_executor(self.executor, self.predict, texts)
                if len(rows) != len(texts):
                    raise RuntimeError(f"{len(rows)} predictions for {len(texts)} notes")
            except Exception as exc:  # every waiting request gets the error
                log.error("prediction failed: %s", type(exc).__name__)
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            self.batches += 1
            start = 0
            for job in batch:
                if not job.future.done():
                    job.future.set_result(rows[start:start + len(job.texts)])
                start += len(job.texts)


# ----------------------------------------------------------------------------- guard
async def _send_json(send, status: int, body: dict[str, Any],
                     headers: dict[str, str] | None = None) -> None:
    import json

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
        self.api_key = api_key.encode() if api_key else None
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
            await self._handle(scope, receive, send_logged, path)
        finally:
            log.info("%s %s %d %.1fms", scope.get("method", "-"),
                     path if path in ROUTES else "<other>", status[0],
                     (time.perf_counter() - start) * 1000)

    async def _handle(self, scope, receive, send, path: str) -> None:
        if self.api_key and path not in PUBLIC and not self._authorized(scope):
            await _send_json(send, 401, {"detail": "missing or invalid API key "
                                         "(send 'Authorization: Bearer <key>')"},
                             {"www-authenticate": "Bearer"})
            return
        too_big = {"detail": f"request body larger than {self.max_body} bytes"}
        headers = dict(scope.get("headers", []))
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body:
            await _send_json(send, 413, too_big)
            return
        kind = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if scope.get("method") == "POST" and kind not in (b"application/json", b"") \
                and not kind.endswith(b"+json"):
            await _send_json(send, 415, {"detail": f"send JSON (content-type: application/json), "
                                         f"not {kind.decode('latin-1')[:60]}"})
            return
        chunks, size, more = [], 0, True
        while more:  # read the whole (bounded) body first, then replay it to the app
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                await _send_json(send, 413, too_big)
                return
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


# ----------------------------------------------------------------------------- app
def _loader(model: Any) -> tuple[Callable[[], Any], str]:
    """(factory, display name) for a Predictor factory, a model directory or a models:/ URI."""
    if callable(model):
        return model, str(getattr(model, "model_name", "custom"))
    source = str(model)

    def load():
        from medtune.predict import Predictor

        local = source
        if source.startswith("models:/"):
            from medtune.registry import resolve_model_uri

            local = resolve_model_uri(source)
        return Predictor.from_path(local)

    return load, source if source.startswith("models:/") else Path(source).name


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _error_message(errors: list[dict[str, Any]]) -> str:
    parts = []
    for err in errors[:5]:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        where = "".join(f"[{x}]" if x.isdigit() else f".{x}" for x in loc).lstrip(".")
        parts.append(f"{where or 'body'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


def create_app(model: Any, *, api_key: str | None = None, max_body_bytes: int = 1_000_000,
               max_note_chars: int = 20_000, max_batch: int = 64, max_concurrency: int = 8,
               batch_window_ms: float = 5, max_batch_size: int = 32) -> FastAPI:
    """The service for ``model``: a Predictor factory (a callable returning an object with
    ``labels`` and ``predict_texts``), a model directory, or a ``models:/NAME@alias`` URI.
    The model is loaded in the background at startup; /readyz says when it is ready."""
    api_key = api_key if api_key is not None else (os.environ.get("MEDTUNE_API_KEY") or None)
    factory, model_name = _loader(model)
    state: dict[str, Any] = {"predictor": None, "error": None, "inflight": 0, "batcher": None}
    page = resources.files("medtune").joinpath("web/index.html").read_text(encoding="utf-8")
    page = page.replace("{{MAX_NOTE_CHARS}}", str(max_note_chars))

    Note = Annotated[str, Field(max_length=max_note_chars)]

    class PredictRequest(BaseModel):
        """One note (``note``) or a batch (``notes``), not both."""

        model_config = ConfigDict(extra="forbid")
        note: Note | None = Field(None, description="One clinical note.")
        notes: Annotated[list[Note], Field(min_length=1, max_length=max_batch)] | None = \
            Field(None, description=f"Up to {max_batch} notes.")
        min_confidence: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] | None = Field(
            None, description="Abstain below this probability (default: the model's).")

        @model_validator(mode="after")
        def _one_of(self):
            if (self.note is None) == (self.notes is None):
                raise ValueError("send exactly one of 'note' or 'notes'")
            return self

    class Alternative(BaseModel):
        label: str
        probability: float | None

    class Prediction(BaseModel):
        label: str
        confidence: float | None
        top_k: list[Alternative]
        abstained: bool

    class PredictResponse(BaseModel):
        predictions: list[Prediction]
        model: str
        latency_ms: float

    class LabelsResponse(BaseModel):
        labels: list[str]
        model: str

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        executor = ThreadPoolExecutor(1, thread_name_prefix="medtune-predict")
        loop = asyncio.get_running_loop()

        async def load():
            try:
                predictor = await loop.run_in_executor(executor, factory)
            except Exception as exc:  # reported by /readyz; the process stays up
                state["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                log.error("model failed to load: %s", state["error"])
                return
            state["batcher"] = batcher = MicroBatcher(
                predictor.predict_texts, executor=executor, window_ms=batch_window_ms,
                max_size=max_batch_size)
            state["predictor"] = predictor
            merged = getattr(predictor, "merged_dtype", None)
            cast = getattr(predictor, "weights_dtype", None)
            log.info("model %s ready (%d labels%s)", model_name, len(predictor.labels),
                     f"; adapter merged in memory, {merged} weights" if merged
                     else f"; linear layers cast to {cast}" if cast else "")
            await batcher.run()

        task = asyncio.create_task(load())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="medtune", version="1", lifespan=lifespan,
                  description="Clinical note -> protocol label, with confidence and abstention.")
    app.state.medtune = state
    bearer = [Depends(HTTPBearer(auto_error=False))] if api_key else []
    errors = {401: {"description": "Missing or invalid API key"},
              413: {"description": "Request body too large"},
              429: {"description": "Too many concurrent requests"},
              503: {"description": "Model not loaded yet"}}

    def unavailable() -> JSONResponse | None:
        if state["predictor"] is not None:
            return None
        detail = f"model failed to load: {state['error']}" if state["error"] else \
            "model is loading"
        return JSONResponse({"detail": detail}, 503, headers={"Retry-After": "5"})

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # the default handler echoes the offending input (a note) back; this one does not
        detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""),
                   "type": e.get("type", "")} for e in exc.errors()]
        return JSONResponse({"detail": detail, "message": _error_message(detail)}, 422)

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_CSP,
                                           "Cache-Control": "no-store"})

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", responses={503: errors[503]})
    async def readyz() -> Any:
        return unavailable() or {"status": "ready", "model": model_name}

    @app.get("/v1/labels", dependencies=bearer, response_model=LabelsResponse,
             responses={k: errors[k] for k in (401, 503)})
    async def labels() -> Any:
        return unavailable() or LabelsResponse(labels=list(state["predictor"].labels),
                                               model=model_name)

    @app.post("/v1/predict", dependencies=bearer, response_model=PredictResponse,
              responses=errors)
    async def predict(body: PredictRequest) -> Any:
        start = time.perf_counter()
        if (busy := unavailable()) is not None:
            return busy
        if state["inflight"] >= max_concurrency:
            return JSONResponse({"detail": f"more than {max_concurrency} requests in flight; "
                                 "retry shortly"}, 429, headers={"Retry-After": "1"})
        texts = body.notes if body.notes is not None else [body.note]
        state["inflight"] += 1
        try:
            rows = await state["batcher"].submit(texts)
        except Exception:  # logged by the batcher (exception type only)
            return JSONResponse({"detail": "prediction failed"}, 500)
        finally:
            state["inflight"] -= 1
        out = []
        for text, row in zip(texts, rows, strict=True):
            confidence = _finite(row.get("confidence"))
            abstained = bool(row.get("abstained"))
            if body.min_confidence is not None:
                abstained = not text.strip() or confidence is None \
                    or confidence < body.min_confidence
            out.append(Prediction(
                label=str(row["prediction"]), confidence=confidence, abstained=abstained,
                top_k=[Alternative(label=str(lab), probability=_finite(p))
                       for lab, p in row.get("top_k", [])]))
        return PredictResponse(predictions=out, model=model_name,
                               latency_ms=round((time.perf_counter() - start) * 1000, 2))

    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes)
    return app


# ----------------------------------------------------------------------------- running
def _check_bind(host: str, api_key: str | None) -> None:
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log.warning("serving on %s without an API key: anyone who can reach it can use it", host)


def _check_port(host: str, port: int) -> None:
    """One error line for an address that cannot be listened on (in use, not this machine's)."""
    import socket

    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.create_server((host, port), family=family):
            pass
    except OSError as exc:
        why = exc.strerror or str(exc)
        raise MedtuneError(f"{host}:{port}: cannot listen there ({why})") from None


def serve(model: Any, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          **limits: Any) -> None:
    """Run the service with uvicorn until interrupted (uvicorn's access log off)."""
    import uvicorn

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    log.setLevel(logging.INFO)
    api_key = api_key or os.environ.get("MEDTUNE_API_KEY") or None
    _check_bind(host, api_key)
    _check_port(host, port)  # before any model is loaded or downloaded
    # a typo or a missing registered model fails now, not as a 503 behind a live server
    if isinstance(model, str | Path) and str(model).startswith("models:/"):
        from medtune.registry import resolve_model_uri

        resolve_model_uri(str(model))  # downloads into the cache; the loader finds it there
    elif isinstance(model, str | Path):
        from medtune.model import model_dir

        model_dir(model)
    app = create_app(model, api_key=api_key, **limits)
    uvicorn.run(app, host=host, port=port, access_log=False, server_header=False,
                log_level="info")


@contextlib.contextmanager
def serving_in_thread(app: Any, host: str = "127.0.0.1", *, ready_timeout: float = 60,
                      wait_ready: bool = True) -> Iterator[str]:
    """Serve ``app`` on a free loopback port in a background thread; yields the base URL.
    With ``wait_ready``, returns only once /readyz says the model is loaded."""
    import httpx
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, access_log=False, log_level="warning",
                                           server_header=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://{host}:{port}"
    deadline = time.monotonic() + ready_timeout
    try:
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        while wait_ready and httpx.get(f"{url}/readyz", timeout=5).status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("model did not become ready")
            time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
