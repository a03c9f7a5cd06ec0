"""`medtune serve`: an HTTP API (FastAPI) and a one-page web client for a trained model.

    GET  /          web page (self-contained: inline CSS/JS, no external assets)
    GET  /healthz   200 while the process is up
    GET  /readyz    200 once the model is loaded; 503 while loading (+ Retry-After) or after a
                    failed load (the reason goes to the server log and the keyed routes)
    GET  /v1/labels the label set
    POST /v1/predict {"note": "..."} or {"notes": [...]}, optional "min_confidence";
                    a multiple-choice (MCQA) model also takes {"question": {"question": "...",
                    "options": [4 strings]}} or {"questions": [...]}; the answer is a letter

Micro-batching: every request puts its notes on one queue; a single worker gathers the requests
that arrive within ``batch_window_ms`` while their notes fit in ``max_batch_size`` (a larger
request runs alone) and runs one ``predict_texts`` call in a worker thread, then resolves each
request's future. Under load, batches fill at once. If a batch of several requests fails, each
runs again alone: one request's bad note fails that request only.

Security: bearer token (``api_key`` or $MEDTUNE_API_KEY) on every route except /, /healthz and
/readyz; body limit (413), JSON bodies only (415), note length and batch size limits (422),
concurrency limit (429), 127.0.0.1 by default. Notes are never logged: the access log holds
method, route, status and latency only (uvicorn's own access log is off).
"""

import asyncio
import contextlib
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, model_validator

from medtune.errors import MedtuneError, describe
from medtune.serve_asgi import Guard, MicroBatcher
from medtune.tables import shown
from medtune.tasks.mcqa import LETTERS, OPTION_COLUMNS, format_question

log = logging.getLogger("medtune.serve")
PAGE_CSP = ("default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
            "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'")


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


def _task(predictor: Any) -> str:
    """'mcqa' or 'protocol' (a custom predictor without a ``task`` attribute: protocol)."""
    return str(getattr(predictor, "task", "protocol"))


def _error_message(errors: list[dict[str, Any]]) -> str:
    parts = []
    for err in errors[:5]:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        where = "".join(f"[{x}]" if x.isdigit() else f".{x}" for x in loc).lstrip(".")
        parts.append(f"{where or 'body'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


def create_app(model: Any, *, api_key: str | None = None, max_body_bytes: int = 1_000_000,
               max_note_chars: int = 20_000, max_batch: int = 64, max_concurrency: int = 8,
               batch_window_ms: float = 5, max_batch_size: int = 32,
               min_confidence: float | None = None, timeout_s: float = 300) -> FastAPI:
    """The service for ``model``: a Predictor factory (a callable returning an object with
    ``labels`` and ``predict_texts``), a model directory, or a ``models:/NAME@alias`` URI.
    The model is loaded in the background at startup; /readyz says when it is ready.
    ``min_confidence``: abstain below it unless a request sets its own (None: the predictor's
    own flags, which for a model directory means only blank notes abstain). ``timeout_s``: a
    request whose prediction takes longer gets 504 (a hung model must not hold clients forever)."""
    api_key = api_key if api_key is not None else (os.environ.get("MEDTUNE_API_KEY") or None)
    if api_key is not None and not api_key.strip():
        raise MedtuneError("the API key is blank: set a non-empty key or none")
    if min_confidence is not None and not 0 <= min_confidence <= 1:
        raise MedtuneError(f"min_confidence must be in [0, 1], got {min_confidence}")
    factory, model_name = _loader(model)
    state: dict[str, Any] = {"predictor": None, "error": None, "inflight": 0, "batcher": None}
    page = resources.files("medtune").joinpath("web/index.html").read_text(encoding="utf-8")
    page = page.replace("{{MAX_NOTE_CHARS}}", str(max_note_chars))

    Note = Annotated[str, Field(max_length=max_note_chars)]

    class Question(BaseModel):
        """A multiple-choice question and its options, lettered A-D in order."""

        model_config = ConfigDict(extra="forbid")
        question: Note
        options: Annotated[list[Note], Field(min_length=len(LETTERS), max_length=len(LETTERS))]

        @model_validator(mode="after")
        def _no_blank_option(self):
            if any(not option.strip() for option in self.options):
                raise ValueError("an option is blank")
            return self

    class PredictRequest(BaseModel):
        """One of: a note, a batch of notes, a question with options, a batch of those."""

        model_config = ConfigDict(extra="forbid")
        note: Note | None = Field(None, description="One clinical note (for a multiple-choice "
                                                    "model: the question with lettered options).")
        notes: Annotated[list[Note], Field(min_length=1, max_length=max_batch)] | None = \
            Field(None, description=f"Up to {max_batch} notes.")
        question: Question | None = Field(None, description="One multiple-choice question "
                                                            "(MCQA models only).")
        questions: Annotated[list[Question], Field(min_length=1, max_length=max_batch)] | None \
            = Field(None, description=f"Up to {max_batch} questions (MCQA models only).")
        min_confidence: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] | None = Field(
            None, description="Abstain below this probability (default: the server's "
                              "--min-confidence, if set).")

        @model_validator(mode="after")
        def _one_of(self):
            sent = [self.note, self.notes, self.question, self.questions]
            if sum(x is not None for x in sent) != 1:
                raise ValueError("send exactly one of 'note', 'notes', 'question' or "
                                 "'questions'")
            return self

        def texts(self) -> tuple[list[str], list[bool]]:
            """(what the model reads, whether each item is blank: answered but abstained)."""
            if self.note is not None or self.notes is not None:
                notes = self.notes if self.notes is not None else [self.note or ""]
                return notes, [not t.strip() for t in notes]
            items = self.questions if self.questions is not None else [self.question]
            texts = [format_question({"question": q.question, **dict(zip(
                OPTION_COLUMNS, q.options, strict=True))}) for q in items if q is not None]
            return texts, [not q.question.strip() for q in items if q is not None]

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
        task: str

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        executor = ThreadPoolExecutor(1, thread_name_prefix="medtune-predict")
        loop = asyncio.get_running_loop()

        async def load():
            try:
                predictor = await loop.run_in_executor(executor, factory)
            except Exception as exc:  # reported by /readyz; the process stays up
                state["error"] = describe(exc)
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
                  description="Clinical note -> protocol label (or multiple-choice question -> "
                              "letter), with confidence and abstention.")
    app.state.medtune = state
    bearer = [Depends(HTTPBearer(auto_error=False))] if api_key else []
    errors = {401: {"description": "Missing or invalid API key"},
              413: {"description": "Request body too large"},
              429: {"description": "Too many concurrent requests"},
              503: {"description": "Model not loaded yet"},
              504: {"description": "Prediction took longer than the server's timeout"}}

    def unavailable(public: bool = False) -> JSONResponse | None:
        if state["predictor"] is not None:
            return None
        if state["error"]:  # no retry will help; the public route does not show paths
            reason = "see the server log" if public else state["error"]
            return JSONResponse({"status": "failed", "detail": f"model failed to load: {reason}"},
                                503)
        return JSONResponse({"status": "loading", "detail": "model is loading"}, 503,
                            headers={"Retry-After": "5"})

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # the default handler echoes the offending input (a note) back; this one does not, nor
        # an unknown key that may be a note ({"<note text>": 1})
        detail = [{"loc": [x if isinstance(x, int) else shown(x, limit=32, words=2)
                           for x in e.get("loc", ())],
                   "msg": e.get("msg", ""), "type": e.get("type", "")} for e in exc.errors()]
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
        return unavailable(public=True) or {"status": "ready", "model": model_name,
                                            "task": _task(state["predictor"])}

    @app.get("/v1/labels", dependencies=bearer, response_model=LabelsResponse,
             responses={k: errors[k] for k in (401, 503)})
    async def labels() -> Any:
        return unavailable() or LabelsResponse(labels=list(state["predictor"].labels),
                                               model=model_name, task=_task(state["predictor"]))

    @app.post("/v1/predict", dependencies=bearer, response_model=PredictResponse,
              responses=errors)
    async def predict(body: PredictRequest) -> Any:
        start = time.perf_counter()
        if (busy := unavailable()) is not None:
            return busy
        if state["inflight"] >= max_concurrency:
            return JSONResponse({"detail": f"more than {max_concurrency} requests in flight; "
                                 "retry shortly"}, 429, headers={"Retry-After": "1"})
        task = _task(state["predictor"])
        if task != "mcqa" and (body.question is not None or body.questions is not None):
            return JSONResponse({"detail": "this model assigns protocols, it does not answer "
                                 "multiple-choice questions: send 'note' or 'notes'"}, 422)
        texts, blank = body.texts()
        state["inflight"] += 1
        try:
            rows = await asyncio.wait_for(state["batcher"].submit(texts), timeout_s)
        except TimeoutError:  # the batcher skips a job whose client has stopped waiting
            log.error("prediction took longer than %gs", timeout_s)
            return JSONResponse({"detail": f"prediction took longer than {timeout_s:g} s"}, 504)
        except Exception:  # logged by the batcher (exception type only)
            return JSONResponse({"detail": "prediction failed"}, 500)
        finally:
            state["inflight"] -= 1
        out = []
        threshold = body.min_confidence if body.min_confidence is not None else min_confidence
        for empty, row in zip(blank, rows, strict=True):
            confidence = _finite(row.get("confidence"))
            abstained = empty or bool(row.get("abstained"))
            if threshold is not None:
                abstained = empty or confidence is None or confidence < threshold
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
    if isinstance(model, str | Path):
        from medtune.model import check_model_path

        local = str(model)
        if local.startswith("models:/"):
            from medtune.registry import resolve_model_uri

            local = resolve_model_uri(local)  # downloads into the cache; the loader finds it there
        check_model_path(local)  # not a model, unfinished, damaged: refused before uvicorn starts
    app = create_app(model, api_key=api_key, **limits)
    # connections beyond this get uvicorn's 503 before any body is read: the guard buffers up
    # to max_body_bytes per request before the app's own 429, so their number must be bounded
    connections = 4 * int(limits.get("max_concurrency", 8)) + 16  # + probes and page loads
    uvicorn.run(app, host=host, port=port, access_log=False, server_header=False,
                log_level="info", limit_concurrency=connections)


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
