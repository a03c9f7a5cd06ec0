"""HTTP service: predictions, readiness, auth, limits (413/422/429/503), micro-batching, logs
without note text, and schema-driven fuzzing with zero 5xx responses."""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest

from conftest import TINY_LABELS, TINY_NOTES

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from medtune.errors import MedtuneError
from medtune.predict import Predictor
from medtune.serve import create_app, serving_in_thread

KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SECRET = "Zyxwv Qwerty MRN 99887766 crushing chest pain"


def _wait_ready(client: TestClient, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "model never became ready"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def client(merged_dir):
    app = create_app(str(merged_dir), api_key=KEY, max_note_chars=300, max_batch=8,
                     max_body_bytes=50_000)
    with TestClient(app) as c:
        _wait_ready(c)
        yield c


@pytest.fixture(scope="module")
def reference(merged_dir):
    return Predictor.from_path(str(merged_dir))


class FakePredictor:
    """Echoes each note's length as its label; optionally blocks until ``gate`` is set."""

    def __init__(self, gate: threading.Event | None = None):
        self.labels = ["A", "B"]
        self.gate = gate
        self.calls: list[int] = []
        self.entered = threading.Event()

    def predict_texts(self, texts):
        self.calls.append(len(texts))
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(20)
        return [{"prediction": f"n{len(t)}", "confidence": 0.75, "abstained": False,
                 "top_k": [[f"n{len(t)}", 0.75], ["B", float("nan")]]} for t in texts]


def test_health_ready_and_page_need_no_key(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json() == {"status": "ready", "model": "model",
                                                    "task": "protocol"}
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    html = page.text
    assert 'maxlength="300"' in html and "{{" not in html
    for external in ("http://", "https://", "src=", "<link", "@import"):
        assert external not in html  # self-contained: no external assets


@pytest.mark.parametrize("method,path", [("get", "/v1/labels"), ("post", "/v1/predict"),
                                         ("get", "/openapi.json"), ("get", "/docs")])
def test_routes_need_the_bearer_key(client, method, path):
    body = {"json": {"note": "x"}} if method == "post" else {}
    response = getattr(client, method)(path, **body)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    for header in ("Bearer nope", "Bearer ", "Bearer", f"Bearer {KEY[:3]}", f"Bearer {KEY}x",
                   f"Basic {KEY}", KEY, f"bearer{KEY}"):  # prefixes, other schemes, no scheme
        wrong = getattr(client, method)(path, headers={"Authorization": header}, **body)
        assert wrong.status_code == 401, header
    assert getattr(client, method)(path, headers=AUTH, **body).status_code == 200
    lower = getattr(client, method)(path, headers={"Authorization": f"bearer {KEY}"}, **body)
    assert lower.status_code == 200  # the scheme is case-insensitive (RFC 7235)


def test_labels_and_openapi(client):
    assert client.get("/v1/labels", headers=AUTH).json() == {"labels": TINY_LABELS,
                                                             "model": "model", "task": "protocol"}
    schema = client.get("/openapi.json", headers=AUTH).json()
    request = schema["components"]["schemas"]["PredictRequest"]["properties"]
    assert request["notes"]["anyOf"][0]["maxItems"] == 8
    assert "/v1/predict" in schema["paths"]
    assert "HTTPBearer" in schema["components"]["securitySchemes"]


def test_predict_one_and_many_match_the_predictor(client, reference):
    notes = TINY_NOTES[:3]
    expected = reference.predict_texts(notes)
    one = client.post("/v1/predict", json={"note": notes[0]}, headers=AUTH)
    assert one.status_code == 200
    body = one.json()
    assert body["model"] == "model" and body["latency_ms"] >= 0
    (pred,) = body["predictions"]
    assert pred["label"] == expected[0]["prediction"] and pred["label"] in TINY_LABELS
    assert pred["confidence"] == pytest.approx(expected[0]["confidence"], abs=1e-5)
    assert pred["top_k"][0] == {"label": pred["label"], "probability": pred["confidence"]}
    assert len(pred["top_k"]) == 3 and pred["abstained"] is False

    many = client.post("/v1/predict", json={"notes": notes}, headers=AUTH).json()
    assert [p["label"] for p in many["predictions"]] == [r["prediction"] for r in expected]


def test_min_confidence_per_request(client):
    body = {"notes": [TINY_NOTES[0], "   "], "min_confidence": 1.0}
    preds = client.post("/v1/predict", json=body, headers=AUTH).json()["predictions"]
    assert [p["abstained"] for p in preds] == [True, True]
    body["min_confidence"] = 0.0
    preds = client.post("/v1/predict", json=body, headers=AUTH).json()["predictions"]
    assert [p["abstained"] for p in preds] == [False, True]  # a blank note always abstains
    for bad in (b"NaN", b"Infinity", b"1.5"):  # JSON's non-standard NaN says what is wrong
        raw = b'{"note": "x", "min_confidence": ' + bad + b"}"
        response = client.post("/v1/predict", content=raw, headers={
            **AUTH, "content-type": "application/json"})
        assert response.status_code == 422
        want = "less than or equal to 1" if bad == b"1.5" else "finite number"
        assert response.json()["message"].startswith("min_confidence: ") and want in \
            response.json()["message"]


def test_odd_unicode_is_handled(client):
    odd = {"notes": ["nul \u0000 byte", "\U0001F600" * 50, "\u202e rtl", "tab\tand\r\n"]}
    response = client.post("/v1/predict", json=odd, headers=AUTH)
    assert response.status_code == 200
    assert all(p["label"] in TINY_LABELS for p in response.json()["predictions"])
    # a lone surrogate is a valid JSON escape but not Unicode: a clear 422, not a crash
    body = json.dumps({"note": "\ud800 lone surrogate"})
    assert "\\ud800" in body
    bad = client.post("/v1/predict", content=body,
                      headers={**AUTH, "Content-Type": "application/json"})
    assert bad.status_code == 422 and "unicode" in bad.json()["message"]


def test_body_limit_413(client):
    big = json.dumps({"note": "x" * 60_000})
    response = client.post("/v1/predict", content=big, headers={**AUTH, "Content-Type":
                                                                "application/json"})
    assert response.status_code == 413 and "50000 bytes" in response.json()["detail"]
    chunked = client.post("/v1/predict", content=iter([big[:30_000].encode(),
                                                       big[30_000:].encode()]),
                          headers={**AUTH, "Content-Type": "application/json"})
    assert chunked.status_code == 413  # no Content-Length: counted while reading


def test_a_body_that_is_not_json_is_415_naming_the_content_type(client):
    body = json.dumps({"note": TINY_NOTES[0]})
    for kind in ("text/plain", "application/x-www-form-urlencoded"):
        response = client.post("/v1/predict", content=body, headers={**AUTH, "Content-Type": kind})
        assert response.status_code == 415
        assert response.json()["detail"] == f"send JSON (content-type: application/json), not {kind}"
    for kind in ("application/json; charset=utf-8", "application/vnd.api+json"):
        response = client.post("/v1/predict", content=body, headers={**AUTH, "Content-Type": kind})
        assert response.status_code == 200, kind


def test_too_long_note_and_batch_422_without_echo(client):
    long_note = SECRET + " x" * 200
    response = client.post("/v1/predict", json={"notes": ["ok", long_note]}, headers=AUTH)
    assert response.status_code == 422
    assert response.json()["message"] == "notes[1]: String should have at most 300 characters"
    assert SECRET not in response.text  # the note is not echoed back
    batch = client.post("/v1/predict", json={"notes": ["a"] * 9}, headers=AUTH)
    assert batch.status_code == 422 and "at most 8 items" in batch.json()["message"]
    both = client.post("/v1/predict", json={"note": "a", "notes": ["b"]}, headers=AUTH)
    assert both.status_code == 422 and "exactly one" in both.json()["message"]
    typo = client.post("/v1/predict", json={"text": "a"}, headers=AUTH)
    assert typo.status_code == 422 and "text: Extra inputs" in typo.json()["message"]
    # a note sent as a key is not echoed either (it came back in "loc" and "message")
    keyed = client.post("/v1/predict", json={"note": "a", f"pt {SECRET} MRN 99887766": 1},
                        headers=AUTH)
    assert keyed.status_code == 422 and "not shown" in keyed.json()["message"]
    assert SECRET not in keyed.text and "99887766" not in keyed.text


def test_access_log_has_no_note_text(client, caplog):
    with caplog.at_level(logging.INFO, logger="medtune.serve"):
        assert client.post("/v1/predict", json={"note": SECRET}, headers=AUTH).status_code == 200
        client.post("/v1/predict", json={"note": SECRET * 20}, headers=AUTH)  # 422
        client.get(f"/v1/{SECRET}", headers=AUTH)  # 404: unknown paths are not logged
    lines = [r.getMessage() for r in caplog.records if r.name == "medtune.serve"]
    assert any(line.startswith("POST /v1/predict 200 ") for line in lines)
    assert any(line.startswith("GET <other> 404 ") for line in lines)
    assert not any("Zyxwv" in r.getMessage() or "Zyxwv" in str(r.args) for r in caplog.records)


def test_concurrency_limit_429():
    gate = threading.Event()
    fake = FakePredictor(gate)
    app = create_app(lambda: fake, max_concurrency=1)
    with TestClient(app) as c:
        _wait_ready(c)
        first: dict = {}
        worker = threading.Thread(target=lambda: first.update(
            r=c.post("/v1/predict", json={"note": "abc"})))
        worker.start()
        assert fake.entered.wait(20)
        busy = c.post("/v1/predict", json={"note": "abcd"})
        assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
        gate.set()
        worker.join(20)
        assert first["r"].status_code == 200
        assert first["r"].json()["predictions"][0]["label"] == "n3"
        # NaN probabilities become null, never invalid JSON
        assert first["r"].json()["predictions"][0]["top_k"][1]["probability"] is None
        assert c.post("/v1/predict", json={"note": "abcd"}).status_code == 200


def _queue_behind_first(app, fake: FakePredictor, gate: threading.Event, post, first,
                        rest: list) -> None:
    """post(first) and hold its batch at ``gate`` until every post(r) of ``rest`` waits in the
    batcher's queue; then release and wait for all of them."""
    threads = [threading.Thread(target=post, args=(first,))]
    threads[0].start()
    assert fake.entered.wait(20)  # the first batch is running; the rest must queue
    threads += [threading.Thread(target=post, args=(r,)) for r in rest]
    for t in threads[1:]:
        t.start()
    queue = app.state.medtune["batcher"].queue
    deadline = time.monotonic() + 20
    while queue.qsize() < len(rest):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    gate.set()
    for t in threads:
        t.join(20)


def test_micro_batching_groups_concurrent_requests():
    gate = threading.Event()
    fake = FakePredictor(gate)
    app = create_app(lambda: fake, max_batch_size=4, batch_window_ms=20, max_concurrency=16)
    results: dict[int, dict] = {}
    with TestClient(app) as c:
        _wait_ready(c)

        def post(n: int) -> None:
            results[n] = c.post("/v1/predict", json={"note": "x" * n}).json()

        _queue_behind_first(app, fake, gate, post, 1, list(range(2, 9)))
    assert fake.calls == [1, 4, 3]  # 7 waiting notes: one batch of max_batch_size, then 3
    assert {n: r["predictions"][0]["label"] for n, r in results.items()} \
        == {n: f"n{n}" for n in range(1, 9)}


def test_not_ready_503_then_ready_and_load_failure():
    gate = threading.Event()

    def slow():
        assert gate.wait(20)
        return FakePredictor()

    with TestClient(create_app(slow)) as c:
        ready = c.get("/readyz")
        assert ready.status_code == 503 and ready.headers["retry-after"] == "5"
        busy = c.post("/v1/predict", json={"note": "a"})
        assert busy.status_code == 503 and busy.json()["detail"] == "model is loading"
        assert c.get("/healthz").status_code == 200
        gate.set()
        _wait_ready(c)
        assert c.post("/v1/predict", json={"note": "a"}).status_code == 200

    def broken():
        raise MedtuneError("/nowhere: model directory not found")

    with TestClient(create_app(broken)) as c:
        deadline = time.monotonic() + 20
        while "failed" not in c.get("/readyz").json()["detail"]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        ready = c.get("/readyz")  # public: no path, and no Retry-After for what will not recover
        assert ready.json()["status"] == "failed" and "nowhere" not in ready.text
        assert "retry-after" not in ready.headers
        assert "model directory not found" in c.get("/v1/labels").json()["detail"]


def test_a_load_failure_without_a_message_is_reported_not_loading_forever():
    def out_of_memory():
        raise MemoryError()  # str() is empty: the failure must still be recorded

    with TestClient(create_app(out_of_memory)) as c:
        deadline = time.monotonic() + 20
        while c.get("/readyz").json()["status"] != "failed":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert c.get("/v1/labels").json()["detail"] == "model failed to load: MemoryError"


def test_one_requests_failing_note_does_not_fail_the_requests_batched_with_it():
    gate = threading.Event()

    class Picky(FakePredictor):
        def predict_texts(self, texts):
            rows = super().predict_texts(texts)
            if "boom" in texts:
                raise ValueError("a note this model cannot score")
            return rows

    fake = Picky(gate)
    app = create_app(lambda: fake, batch_window_ms=20, max_concurrency=16)
    results: dict[str, object] = {}
    with TestClient(app) as c:
        _wait_ready(c)

        def post(note: str) -> None:
            results[note] = c.post("/v1/predict", json={"note": note})

        _queue_behind_first(app, fake, gate, post, "first", ["boom", "fine"])
    assert fake.calls == [1, 2, 1, 1]  # the failed pair, then each request alone
    assert results["boom"].status_code == 500
    assert results["fine"].status_code == 200 and results["first"].status_code == 200
    assert results["fine"].json()["predictions"][0]["label"] == "n4"


def test_a_prediction_that_hangs_is_a_504_and_later_requests_are_still_answered():
    gate = threading.Event()
    fake = FakePredictor(gate)
    with TestClient(create_app(lambda: fake, timeout_s=0.3)) as c:
        _wait_ready(c)
        slow = c.post("/v1/predict", json={"note": "abc"})
        assert slow.status_code == 504 and "longer than 0.3 s" in slow.json()["detail"]
        gate.set()  # the model answers again
        fake.gate = None
        ok = c.post("/v1/predict", json={"note": "abcd"})
        assert ok.status_code == 200 and ok.json()["predictions"][0]["label"] == "n4"
        assert app_inflight(c) == 0


def app_inflight(client: TestClient) -> int:
    return client.app.state.medtune["inflight"]


def test_server_threshold_applies_unless_the_request_sets_its_own():
    with TestClient(create_app(lambda: FakePredictor(), min_confidence=0.8)) as c:
        _wait_ready(c)  # the fake's confidence is 0.75
        assert c.post("/v1/predict", json={"note": "a"}).json()["predictions"][0]["abstained"]
        own = c.post("/v1/predict", json={"note": "a", "min_confidence": 0.5}).json()
        assert own["predictions"][0]["abstained"] is False
    with pytest.raises(MedtuneError, match=r"min_confidence must be in \[0, 1\], got 1.5"):
        create_app(lambda: FakePredictor(), min_confidence=1.5)


def test_api_key_surrounding_whitespace_is_ignored_and_a_blank_key_refused():
    with TestClient(create_app(lambda: FakePredictor(), api_key="from-a-file\n")) as c:
        _wait_ready(c)
        ok = c.get("/v1/labels", headers={"Authorization": "Bearer from-a-file"})
        assert ok.status_code == 200
    with pytest.raises(MedtuneError, match="the API key is blank"):
        create_app(lambda: FakePredictor(), api_key="  ")


def test_a_client_that_leaves_mid_upload_is_logged_as_499_not_500(caplog):
    import asyncio

    from medtune.serve_asgi import Guard

    async def never_called(scope, receive, send):
        raise AssertionError("the app must not run for a request that never arrived")

    async def gone():
        return {"type": "http.disconnect"}

    async def send(message):
        raise AssertionError("nothing is sent to a client that has left")

    scope = {"type": "http", "method": "POST", "path": "/v1/predict", "headers": []}
    with caplog.at_level(logging.INFO, logger="medtune.serve"):
        asyncio.run(Guard(never_called, api_key=None, max_body_bytes=100)(scope, gone, send))
    assert "POST /v1/predict 499" in caplog.text


def test_api_key_from_environment(monkeypatch):
    monkeypatch.setenv("MEDTUNE_API_KEY", "from-env")
    with TestClient(create_app(lambda: FakePredictor())) as c:
        _wait_ready(c)
        assert c.get("/v1/labels").status_code == 401
        ok = c.get("/v1/labels", headers={"Authorization": "Bearer from-env"})
        assert ok.json()["labels"] == ["A", "B"]


def test_fuzz_predict_against_openapi_schema_no_5xx(merged_dir):
    """Schemathesis generates valid and invalid bodies for POST /v1/predict from the OpenAPI
    schema; a live server with the tiny model must never answer 5xx."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode

    app = create_app(str(merged_dir), api_key=KEY, max_note_chars=400, max_batch=6,
                     max_concurrency=64)
    schema = schemathesis.openapi.from_dict(app.openapi())
    operation = schema["/v1/predict"]["POST"]
    cases = st.one_of(operation.as_strategy(GenerationMode.POSITIVE),
                      operation.as_strategy(GenerationMode.NEGATIVE))
    statuses: list[int] = []
    with serving_in_thread(app) as url:

        @settings(max_examples=100, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=cases)
        def check(case):
            response = case.call(base_url=url, headers=AUTH, timeout=30)
            statuses.append(response.status_code)
            assert response.status_code < 500, (response.status_code, response.text[:300])

        check()
    assert len(statuses) >= 50
    assert 200 in statuses and 422 in statuses  # both valid and invalid bodies were sent


def test_serve_refuses_a_missing_model_directory_before_starting(tmp_path, monkeypatch):
    """A mistyped path is one error at once, not a live server answering 503 forever."""
    import uvicorn

    from medtune.serve import serve

    started = []
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: started.append(a))
    with pytest.raises(MedtuneError, match=r"nope: model directory not found"):
        serve(str(tmp_path / "nope"), port=0)
    (tmp_path / "data").mkdir()  # a directory that is no model: it started, then 503 forever
    (tmp_path / "data" / "train.csv").write_text("text,label\n")
    with pytest.raises(MedtuneError, match=r"data: not a model directory"):
        serve(str(tmp_path / "data"), port=0)
    assert started == []
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(MedtuneError, match=r"models:/protocol@champion: no registry here"):
        serve("models:/protocol@champion", port=0)  # was: a live server, never ready
    assert started == [] and not (tmp_path / "mlruns.db").exists()  # and no empty registry made


def test_serve_bounds_the_connections_it_buffers_bodies_for(merged_dir, monkeypatch):
    import uvicorn

    from medtune.serve import serve

    ran: dict = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: ran.update(kw))
    serve(str(merged_dir), port=0, max_concurrency=2)
    assert ran["limit_concurrency"] == 4 * 2 + 16 and ran["access_log"] is False


def test_serve_refuses_a_port_in_use_before_loading_anything(tmp_path, monkeypatch):
    import socket

    import uvicorn

    from medtune.serve import serve

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("server started"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(MedtuneError, match=rf"127.0.0.1:{port}: cannot listen there"):
            serve(str(tmp_path / "not-even-checked"), port=port)


# ----------------------------------------------------------------------------- multiple choice
class FakeMCQA(FakePredictor):
    """A multiple-choice predictor: records the texts it reads, answers 'C'."""

    task = "mcqa"

    def __init__(self):
        super().__init__()
        self.labels = ["A", "B", "C", "D"]
        self.texts: list[str] = []

    def predict_texts(self, texts):
        self.texts.extend(texts)
        return [{"prediction": "C", "confidence": 0.6, "abstained": False,
                 "top_k": [["C", 0.6], ["A", 0.2]]} for _ in texts]


QUESTION = {"question": "Which nerve is affected?",
            "options": ["Ulnar", "Radial", "Median", "Axillary"]}


def _formatted(q: dict) -> str:
    from medtune.tasks.mcqa import OPTION_COLUMNS, format_question

    return format_question({"question": q["question"],
                            **dict(zip(OPTION_COLUMNS, q["options"], strict=True))})


def test_mcqa_question_is_formatted_as_in_training_and_answered_with_a_letter():
    fake = FakeMCQA()
    with TestClient(create_app(lambda: fake)) as c:
        _wait_ready(c)
        assert c.get("/readyz").json()["task"] == "mcqa"
        assert c.get("/v1/labels").json()["task"] == "mcqa"
        one = c.post("/v1/predict", json={"question": QUESTION})
        assert one.status_code == 200 and one.json()["predictions"][0]["label"] == "C"
        expected = _formatted(QUESTION)
        assert fake.texts == [expected] and "C. Median" in expected
        blank = {"question": " ", "options": QUESTION["options"]}
        many = c.post("/v1/predict", json={"questions": [QUESTION, blank]}).json()["predictions"]
        assert [p["abstained"] for p in many] == [False, True]  # a blank question abstains
        # a note is still accepted: the question with its options already written out
        assert c.post("/v1/predict", json={"note": expected}).status_code == 200
        assert fake.texts[-1] == expected


@pytest.mark.parametrize("body,message", [
    ({"question": {"question": "q", "options": ["a", "b", "c"]}}, "question.options"),
    ({"question": {"question": "q", "options": ["a", "b", " ", "d"]}}, "an option is blank"),
    ({"question": QUESTION, "note": "x"}, "exactly one of"),
    ({"questions": []}, "questions"),
])
def test_mcqa_request_errors_are_422_naming_the_field(body, message):
    with TestClient(create_app(FakeMCQA)) as c:
        _wait_ready(c)
        r = c.post("/v1/predict", json=body)
        assert r.status_code == 422 and message in r.json()["message"]


def test_a_protocol_model_refuses_questions():
    fake = FakePredictor()
    with TestClient(create_app(lambda: fake)) as c:
        _wait_ready(c)
        r = c.post("/v1/predict", json={"question": QUESTION})
        assert r.status_code == 422 and "send 'note' or 'notes'" in r.json()["detail"]
        assert fake.calls == []


def test_mcqa_base_model_served_end_to_end_matches_direct_prediction(tiny_base, tmp_path):
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps(["A", "B", "C", "D"]))
    direct = Predictor.from_path(str(tiny_base), labels=str(labels), task="mcqa")
    want = direct.predict_texts([_formatted(QUESTION)])[0]
    app = create_app(lambda: Predictor.from_path(str(tiny_base), labels=str(labels), task="mcqa"))
    with TestClient(app) as c:
        _wait_ready(c)
        got = c.post("/v1/predict", json={"question": QUESTION}).json()["predictions"][0]
    assert got["label"] == want["prediction"] in "ABCD"
    assert got["confidence"] == pytest.approx(want["confidence"], abs=1e-5)
