"""Queue bound (429), request timeout (504, partial answer not returned), and cancellation of
a generation whose client went away, with a scripted generation that sets the pace."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import pytest
import requests

import sparrow
from tests.serve.serving import ScriptedGenerate, serving


@pytest.fixture(scope="module")
def target():
    return sparrow.load_target("tiny:qwen2_vl")


def _body(max_tokens=8, stream=False):
    return {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": max_tokens, "stream": stream}


def _post(url, body, **kwargs):
    return requests.post(f"{url}/v1/chat/completions", json=body, timeout=60, **kwargs)


def _wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def test_full_queue_answers_429_and_the_rest_complete(target):
    gate = threading.Event()
    scripted = ScriptedGenerate(target.tokenizer.convert_tokens_to_ids("a"), step_s=0.001, gate=gate)
    with serving(target, generate_fn=scripted, max_queue=2) as (url, engine), \
            ThreadPoolExecutor(3) as pool:
        running = pool.submit(_post, url, _body())
        _wait_for(lambda: scripted.calls == 1)  # the first is on the worker, held by the gate
        waiting = [pool.submit(_post, url, _body()) for _ in range(2)]
        _wait_for(lambda: engine.queued == 2)
        refused = _post(url, _body())
        assert refused.status_code == 429
        assert refused.json()["error"]["type"] == "rate_limit_error"
        assert int(refused.headers["Retry-After"]) >= 1
        gate.set()
        for future in [running, *waiting]:
            response = future.result()
            assert response.status_code == 200
            assert response.json()["choices"][0]["message"]["content"] == "a" * 8
        assert engine.stats.rejected == 1 and engine.stats.completed == 3


def test_timeout_answers_504_without_the_partial_answer(target):
    scripted = ScriptedGenerate(target.tokenizer.convert_tokens_to_ids("a"), step_s=0.05)
    with serving(target, generate_fn=scripted, timeout_s=0.5, max_tokens=1000) as (url, engine):
        response = _post(url, _body(max_tokens=1000))
        assert response.status_code == 504
        assert response.json()["error"]["code"] == "timeout" and "aaa" not in response.text
        with _post(url, _body(max_tokens=1000, stream=True), stream=True) as streamed:
            assert streamed.status_code == 200  # tokens came before the deadline
            lines = [line for line in streamed.iter_lines() if line]
        assert json.loads(lines[-1][len(b"data: "):])["error"]["code"] == "timeout"
        assert b"data: [DONE]" not in lines
        _wait_for(lambda: not engine.busy)
        assert scripted.stopped == 2  # both generations stopped at the deadline
        assert _post(url, _body(max_tokens=3)).status_code == 200  # and the server serves on


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_cancels_its_generation(target, stream):
    scripted = ScriptedGenerate(target.tokenizer.convert_tokens_to_ids("a"), step_s=0.02)
    with serving(target, generate_fn=scripted, max_tokens=4000) as (url, engine):
        address = urlparse(url)
        body = json.dumps(_body(max_tokens=4000, stream=stream)).encode()
        with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/json\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            _wait_for(lambda: scripted.calls == 1)
            if stream:
                assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        _wait_for(lambda: engine.stats.cancelled == 1)  # 4000 tokens would take 80 s
        assert scripted.stopped == 1 and engine.stats.completed == 0
        assert _post(url, _body(max_tokens=3)).status_code == 200


def test_a_body_that_never_arrives_is_timed_out(target):
    with serving(target, timeout_s=0.5) as (url, _):
        address = urlparse(url)
        with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"model\"")
            started = time.monotonic()
            reply = sock.recv(4096)
            while b"did not arrive" not in reply and (more := sock.recv(4096)):  # the body may
                reply += more  # come in a second packet
            assert reply.startswith(b"HTTP/1.1 408") and b"did not arrive" in reply
            assert time.monotonic() - started < 5
        assert _post(url, _body(max_tokens=2)).status_code == 200


def test_preprocessing_is_bounded_and_counts_in_the_timeout(target, monkeypatch):
    """At most --max-preprocess requests prepare at once; waiting for a slot is part of the
    request's time (504 past it), and a slot is held until its work really ends."""
    from sparrow.serve import completions

    running, peak, lock = [0], [0], threading.Lock()
    real = completions.prepare_request

    def slow_prepare(*args):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.4)
        with lock:
            running[0] -= 1
        return real(*args)

    monkeypatch.setattr(completions, "prepare_request", slow_prepare)
    with serving(target, max_preprocess=1, timeout_s=1.0) as (url, _), ThreadPoolExecutor(4) as pool:
        statuses = [f.result().status_code for f in [pool.submit(_post, url, _body(2)) for _ in range(4)]]
        _wait_for(lambda: running[0] == 0)
    assert peak[0] == 1
    assert statuses.count(200) >= 1 and set(statuses) <= {200, 504} and 504 in statuses


def test_a_stop_inside_a_call_of_several_tokens_ends_the_answer_at_its_token(target):
    """Speculative decoding emits several tokens a call: the answer (text, token ids, usage)
    ends at the token that completed the stop, as plain decoding's would."""
    from sparrow.speculative.generate import GenerationResult

    tokens = [target.tokenizer.convert_tokens_to_ids(c) for c in "abcdefghi"]

    def chunked(target, input_ids, video=None, *, max_new_tokens, on_tokens=None, **_):
        emitted, finish = [], "length"
        for start in range(0, len(tokens), 3):  # three tokens a target call
            emitted += tokens[start:start + 3]
            if on_tokens(tokens[start:start + 3], None):
                finish = "stopped"
                break
        return GenerationResult(token_ids=emitted, method="sparrow",
                                num_prompt_tokens=int(input_ids.shape[1]),
                                num_visual_tokens=0, target_calls=len(emitted) // 3,
                                accepted_lengths=[3] * (len(emitted) // 3), finish_reason=finish)

    with serving(target, generate_fn=chunked) as (url, _):
        for stop, text, kept in (("cd", "ab", 4), ("e", "abcd", 5)):
            answer = _post(url, {**_body(max_tokens=9), "stop": stop}).json()
            assert answer["choices"][0]["message"]["content"] == text
            assert answer["sparrow"]["token_ids"] == tokens[:kept]
            assert answer["usage"]["completion_tokens"] == kept
            assert answer["choices"][0]["finish_reason"] == "stop"
        streamed = _post(url, {**_body(max_tokens=9, stream=True), "stop": ["zz", "ef"]})
        chunks = [json.loads(line[len("data: "):]) for line in streamed.text.split("\n\n")
                  if line.startswith("data: {")]
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        assert text == "abcd"
