"""The server driven by real clients: the official openai package (streaming and not), raw
HTTP for every error case, and a load test. Answers must equal sparrow.api.answer's."""

from __future__ import annotations

import base64
import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest
import requests
import torch

import sparrow
from sparrow.serve.prefix_cache import PrefixCache
from sparrow.video.prompt import render_chat
from tests.serve.serving import serving

TREE = "10-3-4"
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def models():
    target = sparrow.load_target("tiny:qwen2_vl")
    draft = sparrow.init_draft(target, mode="sparrow", seed=0)
    return target, draft


@pytest.fixture(scope="module")
def media(tmp_path_factory, video_file):
    root = tmp_path_factory.mktemp("media")
    clips = {}
    for seed in (0, 1):
        path = root / f"clip{seed}.mp4"
        path.write_bytes(open(video_file(8, seed=seed), "rb").read())
        clips[seed] = path
    (root / "long.mp4").write_bytes(open(video_file(40), "rb").read())
    (root / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    from PIL import Image

    pixels = np.random.default_rng(3).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "still.png")
    return root, clips


@pytest.fixture(scope="module")
def server(models, media):
    target, draft = models
    with serving(target, draft, method="sparrow", tree=TREE, media_roots=[media[0]],
                 max_tokens=64, max_frames=16, max_visual_tokens=12,
                 prefix_cache=PrefixCache(256 * 2**20)) as (url, engine):
        yield url, engine


def reference(models, question, video=None, **kwargs):
    target, draft = models
    kwargs.setdefault("max_new_tokens", MAX_TOKENS)
    return sparrow.answer(target, question, None if video is None else str(video), num_frames=8,
                          method="sparrow", draft=draft, tree=TREE, **kwargs)


def video_message(question, video):
    return {"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": str(video)}}, {"type": "text", "text": question}]}


def client(url, key="unused"):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def test_openai_client_non_streaming_equals_answer(server, models, media):
    url, _ = server
    video = media[1][0]
    expected = reference(models, "What moves?", video)
    response = client(url).chat.completions.create(
        model="tiny", messages=[video_message("What moves?", video)], max_tokens=MAX_TOKENS)
    assert response.choices[0].message.content == expected.text
    assert response.choices[0].finish_reason in ("stop", "length")
    extra = response.model_extra["sparrow"]
    assert extra["token_ids"] == expected.result.token_ids
    assert extra["method"] == "sparrow" and extra["tau"] >= 1 and extra["target_calls"] >= 1
    assert extra["num_visual_tokens"] == expected.result.num_visual_tokens > 0
    assert set(extra["timings"]) >= {"prefill_s", "decode_s", "draft_s", "verify_s"}
    assert response.usage.prompt_tokens == expected.result.num_prompt_tokens
    assert response.usage.completion_tokens == len(expected.result.token_ids)
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_openai_client_streaming_equals_answer(server, models, media):
    url, _ = server
    video = media[1][1]
    expected = reference(models, "Describe it.", video, temperature=0.8, seed=7)
    stream = client(url).chat.completions.create(
        model="tiny", messages=[video_message("Describe it.", video)], max_tokens=MAX_TOKENS,
        temperature=0.8, seed=7, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].model_extra["sparrow"]["token_ids"] == expected.result.token_ids
    assert chunks[-1].usage.completion_tokens == len(expected.result.token_ids)
    assert len(chunks) >= 4  # role chunk, content as it came, finish, usage


def test_text_only_and_multi_turn(server, models):
    url, _ = server
    expected = reference(models, "Say hi.", system="Be brief.")
    response = client(url).chat.completions.create(
        model="tiny", max_tokens=MAX_TOKENS,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}])
    assert response.choices[0].message.content == expected.text
    follow = client(url).chat.completions.create(
        model="tiny", max_tokens=8,
        messages=[{"role": "user", "content": "Say hi."},
                  {"role": "assistant", "content": expected.text},
                  {"role": "user", "content": [{"type": "text", "text": "Again?"}]}])
    assert follow.usage.prompt_tokens > response.usage.prompt_tokens


def test_models_health_and_openapi(server):
    url, _ = server
    assert [m.id for m in client(url).models.list()] == ["tiny"]
    health = requests.get(f"{url}/health", timeout=10).json()
    assert health["status"] == "ok" and health["method"] == "sparrow"
    document = requests.get(f"{url}/openapi.json", timeout=10).json()
    body = document["paths"]["/v1/chat/completions"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"]["$ref"].endswith("ChatCompletionRequest")
    assert "VideoPart" in document["components"]["schemas"]


def test_caller_metadata_fields_are_accepted_and_ignored(server, models):
    url, _ = server
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Say hi."}],
            "max_tokens": MAX_TOKENS, "user": "someone", "metadata": {"x": "1"}, "store": False}
    response = requests.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == reference(models, "Say hi.").text


def _post(url, body=None, raw=None, headers=None):
    data = raw if raw is not None else json.dumps(body)
    return requests.post(f"{url}/v1/chat/completions", data=data, timeout=60,
                         headers={"Content-Type": "application/json", **(headers or {})})


def _chat(content, **extra):
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 4,
            **extra}


def _video(url):
    return [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "Hi"}]


BAD_REQUESTS = {
    "malformed json": (400, dict(raw=b'{"model": "tiny", "messages": [')),
    "not an object": (400, dict(raw=b"[1, 2]")),
    "not utf-8": (400, dict(raw=b"\xff\xfe{}")),
    "no messages": (400, dict(body={"model": "tiny", "messages": []})),
    "missing model": (400, dict(body={"messages": [{"role": "user", "content": "Hi"}]})),
    "wrong model": (404, dict(body={**_chat("Hi"), "model": "gpt-9"})),
    "bad role": (400, dict(body={"model": "tiny", "messages": [{"role": "tool", "content": "x"}]})),
    "missing image": (400, dict(body=_chat([{"type": "image_url", "image_url": {"url": "MEDIA/x.png"}}]))),
    "image with num_frames": (400, dict(body=_chat([{"type": "image_url", "image_url": {
        "url": "MEDIA/still.png"}}], num_frames=2))),
    "image url holding a video": (400, dict(body=_chat([{"type": "image_url", "image_url": {
        "url": "data:video/mp4;base64,AAAA"}}]))),
    "image and video": (400, dict(body=_chat(_video("MEDIA/clip0.mp4") + [
        {"type": "image_url", "image_url": {"url": "MEDIA/still.png"}}]))),
    "audio part": (400, dict(body=_chat([{"type": "input_audio", "input_audio": {}}]))),
    "missing video": (400, dict(body=_chat(_video("MEDIA/nope.mp4")))),
    "corrupt video": (400, dict(body=_chat(_video("MEDIA/corrupt.mp4")))),
    "corrupt data url": (400, dict(body=_chat(_video("data:video/mp4;base64,@@@not-base64")))),
    "data url of an image": (400, dict(body=_chat(_video("data:image/png;base64,AAAA")))),
    "undecodable upload": (400, dict(body=_chat(_video("data:video/mp4;base64,AAAAAAAA")))),
    "remote url": (400, dict(body=_chat(_video("http://example.com/a.mp4")))),
    "two videos": (400, dict(body=_chat(_video("MEDIA/clip0.mp4") + _video("MEDIA/clip1.mp4")))),
    "video from assistant": (400, dict(body={"model": "tiny", "messages": [
        {"role": "assistant", "content": _video("MEDIA/clip0.mp4")}]})),
    "max_tokens 0": (400, dict(body=_chat("Hi", max_tokens=0))),
    "max_tokens -5": (400, dict(body=_chat("Hi", max_tokens=-5))),
    "max_tokens huge": (400, dict(body=_chat("Hi", max_tokens=10**12))),
    "max_completion_tokens over limit": (400, dict(body=_chat("Hi", max_completion_tokens=65))),
    "temperature < 0": (400, dict(body=_chat("Hi", temperature=-1))),
    "temperature string": (400, dict(body=_chat("Hi", temperature="hot"))),
    "top_p 0": (400, dict(body=_chat("Hi", top_p=0))),
    "n over the limit": (400, dict(body=_chat("Hi", n=17))),
    "n 0": (400, dict(body=_chat("Hi", n=0))),
    "top_logprobs without logprobs": (400, dict(body=_chat("Hi", top_logprobs=2))),
    "top_logprobs 21": (400, dict(body=_chat("Hi", logprobs=True, top_logprobs=21))),
    "seed negative": (400, dict(body=_chat("Hi", seed=-1))),
    "five stops": (400, dict(body=_chat("Hi", stop=["a", "b", "c", "d", "e"]))),
    "empty stop": (400, dict(body=_chat("Hi", stop=[""]))),
    "stop token out of range": (400, dict(body=_chat("Hi", stop_token_ids=[10**9]))),
    "too many frames": (400, dict(body=_chat(_video("MEDIA/clip0.mp4"), num_frames=17))),
    "too many frames by fps": (400, dict(body=_chat(_video("MEDIA/long.mp4"), fps=1000))),
    "num_frames and fps": (400, dict(body=_chat(_video("MEDIA/clip0.mp4"), num_frames=2, fps=1))),
    "too many visual tokens": (400, dict(body=_chat(_video("MEDIA/clip0.mp4"), num_frames=16))),
    "lone surrogate": (400, dict(
        raw=b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}')),
    "video token in text": (400, dict(body=_chat("<|video_pad|>"))),
    "empty content": (400, dict(body=_chat(""))),
    "null content": (400, dict(body=_chat(None))),
    "no content parts": (400, dict(body=_chat([]))),
    "temperature tiny": (400, dict(body=_chat("Hi", temperature=1e-300))),
    "file name too long": (400, dict(body=_chat(_video("MEDIA/" + "a" * 300 + ".mp4")))),
    "lone surrogate in video url": (400, dict(raw=b'{"model": "tiny", "messages": [{"role": "user", '
                                              b'"content": [{"type": "video_url", "video_url": '
                                              b'{"url": "\\ud800.mp4"}}]}]}')),
    "lone surrogate in an ignored field": (400, dict(raw=b'{"model": "tiny", "user": "\\udc00", '
                                                     b'"messages": [{"role": "user", "content": "Hi"}]}')),
    "nested 100000 deep": (400, dict(raw=b'{"model": "tiny", "user": ' + b"[" * 100_000
                                     + b"]" * 100_000 + b"}")),
    "nested 40 deep": (400, dict(raw=b'{"model": "tiny", "user": ' + b"[" * 40 + b"]" * 40 + b"}")),
    "response_format": (400, dict(body=_chat("Hi", response_format={"type": "json_object"}))),
    "logit_bias": (400, dict(body=_chat("Hi", logit_bias={"42": 100}))),
    "tool_choice": (400, dict(body=_chat("Hi", tool_choice="none"))),
    "unknown field": (400, dict(body=_chat("Hi", not_a_field={"x": 1}))),
    "max_tokens as a string": (400, dict(body=_chat("Hi", max_tokens="5"))),
    "max_tokens true": (400, dict(body=_chat("Hi", max_tokens=True))),
    "stream as a string": (400, dict(body=_chat("Hi", stream="yes"))),
    "context overflow": (400, dict(body=_chat("x" * 5000, max_tokens=64))),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_a_4xx_openai_error_and_the_server_keeps_serving(server, media, case):
    url, _ = server
    status, request = BAD_REQUESTS[case]
    if "body" in request:
        request = {"body": json.loads(json.dumps(request["body"]).replace("MEDIA", str(media[0])))}
    response = _post(url, **request)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code"} and error["message"]
    assert "sparrow-upload" not in error["message"]  # no server-side temporary paths
    assert _post(url, _chat("Hi", max_tokens=2)).status_code == 200


def test_unknown_route_and_method_get_openai_errors(server):
    url, _ = server
    missing = requests.get(f"{url}/v1/nothing", timeout=10)
    assert missing.status_code == 404 and "error" in missing.json()
    wrong = requests.get(f"{url}/v1/chat/completions", timeout=10)
    assert wrong.status_code == 405 and "error" in wrong.json()


def test_stream_is_sse_events_ending_in_done(server):
    """The raw framing the openai client hides: each event one `data: <json>` line and a
    blank line, one completion id throughout, the usage chunk last, then `data: [DONE]`."""
    url, _ = server
    body = _chat("Hi", stream=True, stream_options={"include_usage": True})
    response = requests.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    assert response.text.endswith("\n\n")
    events = response.text[:-2].split("\n\n")
    assert all(event.startswith("data: ") and "\n" not in event for event in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(event[len("data: "):]) for event in events[:-1]]
    assert chunks[0]["id"].startswith("chatcmpl-") and {c["id"] for c in chunks} == {chunks[0]["id"]}
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "tiny" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    *_, finish, usage = chunks
    assert finish["choices"][0]["finish_reason"] in ("stop", "length")
    assert usage["choices"] == []
    assert usage["usage"]["completion_tokens"] == len(finish["sparrow"]["token_ids"])


def test_upload_as_data_url_equals_answer(server, models, media):
    url, _ = server
    video = media[1][0]
    data = base64.b64encode(video.read_bytes()).decode()
    response = client(url).chat.completions.create(
        model="tiny", max_tokens=MAX_TOKENS,
        messages=[video_message("What moves?", f"data:video/mp4;base64,{data}")])
    assert response.choices[0].message.content == reference(models, "What moves?", video).text


def test_load_8_clients_x_5_requests_all_correct(server, models, media, capsys):
    url, engine = server
    jobs = []
    for c in range(8):
        for r in range(5):
            video = media[1][(c + r) % 2] if (c + r) % 3 else None
            jobs.append((c, f"Question {r} from client {c}?", video, c % 2 == 0))
    expected = {(q, str(v)): reference(models, q, v).text for _, q, v, _ in jobs}
    done_before = engine.stats.completed
    latencies, results, lock = [], [], threading.Lock()

    def run_client(c):
        api = client(url)
        for _, question, video, stream in [j for j in jobs if j[0] == c]:
            messages = [video_message(question, video) if video else
                        {"role": "user", "content": question}]
            t0 = time.perf_counter()
            if stream:
                chunks = list(api.chat.completions.create(
                    model="tiny", messages=messages, max_tokens=MAX_TOKENS, stream=True))
                text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
                finish = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
                assert len(finish) == 1
            else:
                text = api.chat.completions.create(
                    model="tiny", messages=messages, max_tokens=MAX_TOKENS).choices[0].message.content
            with lock:
                latencies.append(time.perf_counter() - t0)
                results.append((question, str(video), text))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(run_client, range(8)))
    wall = time.perf_counter() - t0
    assert len(results) == 40 and engine.stats.completed - done_before == 40
    for question, video, text in results:
        assert text == expected[(question, video)]
    q = statistics.quantiles(latencies, n=20)
    with capsys.disabled():
        print(f"\nload test: 40 requests (8 clients x 5), wall {wall:.2f} s, "
              f"p50 {statistics.median(latencies):.3f} s, p95 {q[18]:.3f} s, "
              f"max {max(latencies):.3f} s")


def test_follow_up_questions_reuse_the_video_prefill(server, models, media):
    """A second question about the same video (a new conversation, then the same one) is
    answered from the cached video prefill, and exactly as a cold `answer`."""
    url, engine = server
    video = media[1][0]
    chat = client(url)
    first = chat.chat.completions.create(
        model="tiny", messages=[video_message("Count the shapes.", video)], max_tokens=MAX_TOKENS)
    hits = engine.prefix_cache.stats.hits
    second = chat.chat.completions.create(
        model="tiny", messages=[video_message("Which way does it move?", video)],
        max_tokens=MAX_TOKENS)
    assert engine.prefix_cache.stats.hits == hits + 1
    health = requests.get(f"{url}/health", timeout=10).json()["prefix_cache"]
    assert health["hits"] == hits + 1 and 0 < health["bytes"] <= health["max_bytes"]
    expected = reference(models, "Which way does it move?", video)
    assert second.model_extra["sparrow"]["token_ids"] == expected.result.token_ids
    messages = [video_message("Count the shapes.", video),
                {"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "And the colours?"}]
    follow_up = chat.chat.completions.create(model="tiny", max_tokens=MAX_TOKENS,
                                             messages=messages)
    assert engine.prefix_cache.stats.hits == hits + 2
    target, draft = models
    inputs = sparrow.prepare_video(target, video, num_frames=8)
    template = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str)
                 else [{"type": "video"}, {"type": "text", "text": "Count the shapes."}]}
                for m in messages]
    cold = sparrow.generate(target, render_chat(target.tokenizer, target.config, template, inputs),
                            inputs, method="sparrow", draft=draft, tree=TREE,
                            max_new_tokens=MAX_TOKENS)
    assert follow_up.model_extra["sparrow"]["token_ids"] == cold.token_ids


def test_stop_strings_and_tokens_end_the_answer_where_plain_decoding_would(server, models):
    """A stop string spanning a token boundary and a stop token cut the speculative answer at
    the same token as plain decoding, streamed or not; the text excludes the stop."""
    url, _ = server
    target, _ = models
    tokenizer = target.tokenizer
    full = reference(models, "Say hi.")
    ids = full.result.token_ids
    prefixes = [tokenizer.decode(ids[:n], skip_special_tokens=True) for n in range(len(ids) + 1)]
    n = next(n for n in range(3, len(ids)) if prefixes[n] and len(full.text) >= len(prefixes[n]) + 2)
    stop = full.text[len(prefixes[n]) - 1 : len(prefixes[n]) + 2]  # token n - 1's end and what follows
    cut = full.text.index(stop)
    ends = next(k for k in range(1, len(ids) + 1) if stop in prefixes[k])
    api = client(url)
    plain = api.chat.completions.create(model="tiny", max_tokens=MAX_TOKENS, stop=[stop],
                                        messages=[{"role": "user", "content": "Say hi."}])
    assert plain.choices[0].message.content == full.text[:cut]
    assert plain.choices[0].finish_reason == "stop"
    assert plain.model_extra["sparrow"]["token_ids"] == ids[:ends]
    chunks = list(api.chat.completions.create(model="tiny", max_tokens=MAX_TOKENS, stop=stop, stream=True,
                                              messages=[{"role": "user", "content": "Say hi."}]))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.text[:cut]
    token = ids[2]
    by_token = api.chat.completions.create(model="tiny", max_tokens=MAX_TOKENS,
                                           extra_body={"stop_token_ids": [token]},
                                           messages=[{"role": "user", "content": "Say hi."}])
    first = ids.index(token)
    assert by_token.model_extra["sparrow"]["token_ids"] == ids[:first + 1]
    assert by_token.choices[0].message.content == tokenizer.decode(ids[:first], skip_special_tokens=True)
    assert by_token.choices[0].finish_reason == "stop"


def test_an_image_is_answered_as_a_one_frame_video(server, models, media):
    """image_url parts (OpenAI's format): a data URL or a file under the media root, read as a
    one-frame video; the answer equals sparrow.answer on the image with num_frames=1."""
    url, _ = server
    target, draft = models
    still = media[0] / "still.png"
    expected = sparrow.answer(target, "What is shown?", str(still), num_frames=1, method="sparrow",
                              draft=draft, tree=TREE, max_new_tokens=MAX_TOKENS)
    data = "data:image/png;base64," + base64.b64encode(still.read_bytes()).decode()
    for reference_url in (data, str(still)):
        response = client(url).chat.completions.create(model="tiny", max_tokens=MAX_TOKENS, messages=[
            {"role": "user", "content": [{"type": "image_url",
                                          "image_url": {"url": reference_url, "detail": "low"}},
                                         {"type": "text", "text": "What is shown?"}]}])
        assert response.model_extra["sparrow"]["token_ids"] == expected.result.token_ids
        assert response.model_extra["sparrow"]["num_visual_tokens"] == expected.result.num_visual_tokens > 0


def test_plain_completions_continue_the_prompt_as_generate_does(server, models):
    """/v1/completions: the prompt tokenized as it is, no chat template; the same tokens as
    sparrow.generate on those ids, streamed or not; OpenAI's default of 16 tokens."""
    url, _ = server
    target, draft = models
    ids = target.tokenizer("Once upon a time")["input_ids"]
    expected = sparrow.generate(target, torch.tensor([ids]), None, method="sparrow", draft=draft, tree=TREE,
                                max_new_tokens=MAX_TOKENS)
    text = target.tokenizer.decode(expected.token_ids, skip_special_tokens=True)
    api = client(url)
    done = api.completions.create(model="tiny", prompt="Once upon a time", max_tokens=MAX_TOKENS)
    assert done.object == "text_completion" and done.id.startswith("cmpl-")
    assert done.choices[0].text == text and done.model_extra["sparrow"]["token_ids"] == expected.token_ids
    assert done.usage.prompt_tokens == len(ids)
    streamed = list(api.completions.create(model="tiny", prompt=["Once upon a time"], max_tokens=MAX_TOKENS,
                                           stream=True))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text
    assert api.completions.create(model="tiny", prompt="Hi").usage.completion_tokens <= 16


@pytest.mark.parametrize("extra", [{"prompt": []}, {"prompt": ["a", "b"]}, {"prompt": ""}, {"echo": True},
                                   {"logprobs": 21}, {"logprobs": True}, {"suffix": "x"}, {"best_of": 2},
                                   {"messages": []}, {"max_tokens": "5"}])
def test_bad_plain_completions_get_a_400(server, extra):
    url, _ = server
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 2, **extra}
    response = requests.post(f"{url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["message"]
