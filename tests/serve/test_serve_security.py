"""Local videos only under --media-root (no existence oracle), the API key, upload limits."""

from __future__ import annotations

import base64
import os

import openai
import pytest
import requests

import sparrow
from sparrow.serve.media import FORBIDDEN
from tests.serve.serving import serving


@pytest.fixture(scope="module")
def target():
    return sparrow.load_target("tiny:qwen2_vl")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, video_file):
    root = tmp_path_factory.mktemp("root")
    outside = tmp_path_factory.mktemp("outside")
    clip = open(video_file(4), "rb").read()
    (root / "sub").mkdir()
    (root / "sub" / "inside.mp4").write_bytes(clip)
    (outside / "secret.mp4").write_bytes(clip)
    os.symlink(outside / "secret.mp4", root / "link_out.mp4")
    os.symlink(root / "sub" / "inside.mp4", root / "link_in.mp4")
    return root, outside


def _ask(url, video_url, headers=None):
    body = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": video_url}}, {"type": "text", "text": "Hi"}]}]}
    return requests.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60)


def test_paths_outside_the_media_roots_are_refused_alike(target, dirs):
    root, outside = dirs
    with serving(target, media_roots=[root]) as (url, _):
        for allowed in (f"{root}/sub/inside.mp4", f"file://{root}/sub/inside.mp4",
                        "sub/inside.mp4", f"{root}/link_in.mp4", f"{root}/sub/../sub/inside.mp4"):
            assert _ask(url, allowed).status_code == 200, allowed
        refused = [f"{outside}/secret.mp4", f"{outside}/missing.mp4", f"file://{outside}/secret.mp4",
                   f"{root}/../{outside.name}/secret.mp4", f"{root}/../{outside.name}/missing.mp4",
                   "../" + outside.name + "/secret.mp4", f"{root}/link_out.mp4", "/etc/passwd",
                   "/nonexistent/x.mp4", f"{root}/sub/\u0000inside.mp4"]
        bodies = set()
        for path in refused:
            response = _ask(url, path)
            assert response.status_code == 403, path
            bodies.add(response.text)
        assert len(bodies) == 1 and FORBIDDEN in bodies.pop()  # one answer for all


@pytest.mark.parametrize("lnk", ["symlink to a deeper directory", "directory", "missing"])
def test_what_lies_outside_the_roots_does_not_change_the_answer(target, dirs, tmp_path, lnk):
    """`..` is applied as written: `outside/lnk/../..` is `outside/..` whatever `lnk` is (a
    symlink resolved first would lead elsewhere and tell the client it is one)."""
    root, _ = dirs
    outside = tmp_path / "outside"
    (outside / "deep" / "er").mkdir(parents=True)
    if lnk == "directory":
        (outside / "lnk").mkdir()
    elif lnk.startswith("symlink"):
        os.symlink(outside / "deep" / "er", outside / "lnk")
    os.symlink(root, tmp_path / "media")  # the root, reached from `outside`
    with serving(target, media_roots=[tmp_path / "media"]) as (url, _):
        response = _ask(url, "../outside/lnk/../../media/sub/inside.mp4")
        assert response.status_code == 200, response.text


def test_no_media_root_means_uploads_only(target, dirs):
    root, _ = dirs
    clip = (root / "sub" / "inside.mp4").read_bytes()
    with serving(target) as (url, _):
        assert _ask(url, f"{root}/sub/inside.mp4").status_code == 403
        assert _ask(url, f"{root}/sub/missing.mp4").status_code == 403
        upload = "data:video/mp4;base64," + base64.b64encode(clip).decode()
        assert _ask(url, upload).status_code == 200


def test_upload_size_limit_answers_413(target, dirs):
    root, _ = dirs
    clip = (root / "sub" / "inside.mp4").read_bytes()
    upload = "data:video/mp4;base64," + base64.b64encode(clip).decode()
    with serving(target, max_upload_bytes=len(upload) // 2) as (url, _):
        response = _ask(url, upload)
        assert response.status_code == 413 and "error" in response.json()
        chunked = requests.post(f"{url}/v1/chat/completions", timeout=60,
                                data=iter([b'{"model": "tiny", "x": "', b"y" * len(upload), b'"}']))
        assert chunked.status_code == 413  # no Content-Length: counted while reading
        assert _ask(url, "data:video/mp4;base64,AAAA").status_code == 400  # small: serves on


def test_api_key_guards_everything_but_health(target, monkeypatch):
    with serving(target, api_key="s3cret") as (url, _):
        stranger = requests.get(f"{url}/health", timeout=10)
        assert stranger.status_code == 200 and stranger.json() == {"status": "ok"}  # nothing more
        keyed = requests.get(f"{url}/health", headers={"Authorization": "Bearer s3cret"}, timeout=10)
        assert keyed.json()["status"] == "ok" and "stats" in keyed.json() and "queued" in keyed.json()
        for path in ("/v1/models", "/openapi.json", "/docs"):
            assert requests.get(f"{url}{path}", timeout=10).status_code == 401
            wrong = requests.get(f"{url}{path}", headers={"Authorization": "Bearer nope"}, timeout=10)
            assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
        good = {"Authorization": "Bearer s3cret"}
        assert requests.get(f"{url}/v1/models", headers=good, timeout=10).status_code == 200
        body = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}
        assert requests.post(f"{url}/v1/chat/completions", json=body, timeout=60).status_code == 401
        api = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert api.chat.completions.create(**body).choices[0].message.content is not None
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).models.list()


def test_a_target_without_chat_template_takes_one_user_message():
    target = sparrow.load_target("tiny:qwen2_vl")
    target.tokenizer.chat_template = None
    with serving(target) as (url, _):
        def post(messages):
            return requests.post(f"{url}/v1/chat/completions", timeout=60, json={
                "model": "tiny", "max_tokens": 2, "messages": messages})

        assert post([{"role": "user", "content": "Hi"}]).status_code == 200
        for messages in ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                         [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                          {"role": "user", "content": "Again"}]):
            response = post(messages)
            assert response.status_code == 400 and "chat template" in response.json()["error"]["message"]


def test_every_response_carries_a_request_id(target):
    with serving(target, api_key="k") as (url, _):
        good = {"Authorization": "Bearer k"}
        mine = requests.get(f"{url}/v1/models", headers={**good, "X-Request-Id": "abc-123"}, timeout=10)
        assert mine.headers["X-Request-Id"] == "abc-123"  # the client's own, echoed
        fresh = [requests.get(f"{url}/v1/models", headers=good, timeout=10).headers["X-Request-Id"]
                 for _ in range(2)]
        assert fresh[0] != fresh[1] and len(fresh[0]) == 32
        for response in (requests.get(f"{url}/v1/models", timeout=10),  # 401
                         requests.get(f"{url}/nothing", headers=good, timeout=10),  # 404
                         requests.get(f"{url}/v1/models", timeout=10,
                                      headers={**good, "X-Request-Id": "x" * 500})):
            assert 0 < len(response.headers["X-Request-Id"]) <= 128


def test_cors_preflight_is_answered_without_the_key_and_only_for_allowed_origins(target):
    with serving(target, api_key="k", allowed_origins=["https://app.example"]) as (url, _):
        preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "authorization,content-type"}
        answer = requests.options(f"{url}/v1/chat/completions", headers=preflight, timeout=10)
        assert answer.status_code == 200
        assert answer.headers["Access-Control-Allow-Origin"] == "https://app.example"
        other = requests.options(f"{url}/v1/chat/completions", timeout=10,
                                 headers={**preflight, "Origin": "https://evil.example"})
        assert "Access-Control-Allow-Origin" not in other.headers
        body = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}
        call = requests.post(f"{url}/v1/chat/completions", json=body, timeout=60,
                             headers={"Origin": "https://app.example", "Authorization": "Bearer k"})
        assert call.status_code == 200 and call.headers["Access-Control-Allow-Origin"] == "https://app.example"
        assert requests.post(f"{url}/v1/chat/completions", json=body, timeout=60,
                             headers={"Origin": "https://app.example"}).status_code == 401  # still keyed


def test_metrics_count_what_the_server_did(target):
    from prometheus_client.parser import text_string_to_metric_families

    def scrape(url, headers):
        text = requests.get(f"{url}/metrics", headers=headers, timeout=10).text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    with serving(target, api_key="k") as (url, _):
        good = {"Authorization": "Bearer k"}
        assert requests.get(f"{url}/metrics", timeout=10).status_code == 401  # keyed like the rest
        body = {"model": "tiny", "max_tokens": 3, "messages": [{"role": "user", "content": "Hi"}]}
        answer = requests.post(f"{url}/v1/chat/completions", json=body, headers=good, timeout=60).json()
        requests.post(f"{url}/v1/chat/completions", json={**body, "n": 0}, headers=good, timeout=60)  # 400
        response = requests.get(f"{url}/metrics", headers=good, timeout=10)
        assert response.headers["content-type"].startswith("text/plain")
        metrics = scrape(url, good)
        assert metrics[("sparrow_requests_total", (("outcome", "completed"),))] == 1
        assert metrics[("sparrow_completion_tokens_total", ())] == answer["usage"]["completion_tokens"]
        assert metrics[("sparrow_prompt_tokens_total", ())] == answer["usage"]["prompt_tokens"]
        assert metrics[("sparrow_target_calls_total", ())] == answer["sparrow"]["target_calls"]
        assert metrics[("sparrow_http_responses_total", (("status", "400"),))] == 1
        assert metrics[("sparrow_http_responses_total", (("status", "401"),))] == 1
        assert metrics[("sparrow_queue_depth", ())] == 0 and metrics[("sparrow_decode_seconds_total", ())] > 0
