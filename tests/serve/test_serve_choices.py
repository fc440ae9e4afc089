"""`logprobs` / `top_logprobs` and `n` through the official openai client, on a speculative
server: the logprobs are the ones `generate(logprobs=k)` computes (themselves checked against
transformers in tests/speculative/test_logprobs.py), streamed or not, cut with the answer at a
stop; n choices are n seeded generations (seed + i), streamed one after another by index."""

from __future__ import annotations

import openai
import pytest
import torch

import sparrow
from sparrow.serve.logprobs import token_text
from sparrow.speculative.sampling import SamplingParams
from sparrow.speculative.tree import TreeSpec
from sparrow.video.prompt import render_chat
from tests.serve.serving import serving
from tests.speculative.test_lossless import OracleProposer, _room_for

TREE = "10-3-4"
MAX_TOKENS = 20
QUESTION = [{"role": "user", "content": "Tell me a story."}]


@pytest.fixture(scope="module")
def models():
    target = sparrow.load_target("tiny:qwen2_vl")
    return target, sparrow.init_draft(target, mode="sparrow", seed=0)


@pytest.fixture(scope="module")
def api(models):
    target, draft = models
    with serving(target, draft, method="sparrow", tree=TREE, max_tokens=64) as (url, _):
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def expected(models, top: int | None = None, prompt=None, **sampling):
    target, draft = models
    ids = render_chat(target.tokenizer, target.config, QUESTION, None) if prompt is None else prompt
    return sparrow.generate(target, ids, None, method="sparrow", draft=draft, tree=TREE,
                            max_new_tokens=MAX_TOKENS, sampling=SamplingParams(**sampling),
                            logprobs=top)


def test_chat_logprobs_are_the_targets_streamed_or_not(api, models):
    target, _ = models
    truth = expected(models, top=2, temperature=0.9, seed=11)
    answer = api.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=MAX_TOKENS,
                                         temperature=0.9, seed=11, logprobs=True, top_logprobs=2)
    content = answer.choices[0].logprobs.content
    assert len(content) == len(truth.token_ids) == answer.usage.completion_tokens
    for entry, item in zip(content, truth.logprobs, strict=True):
        assert entry.token == token_text(target.tokenizer, item.token)[0]
        assert entry.logprob == item.logprob and bytes(entry.bytes).decode() == entry.token
        assert [(top.token, top.logprob) for top in entry.top_logprobs] == [
            (token_text(target.tokenizer, token)[0], value) for token, value in item.top]
    chunks = list(api.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=MAX_TOKENS,
                                              temperature=0.9, seed=11, logprobs=True, top_logprobs=2,
                                              stream=True))
    streamed = [entry for c in chunks if c.choices and c.choices[0].logprobs
                for entry in c.choices[0].logprobs.content]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in content]
    plain = api.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=4)
    assert plain.choices[0].logprobs is None


def test_logprobs_end_with_the_answer_at_a_stop_inside_a_round(models):
    """A stop cuts the logprobs where it cuts the token ids (the token that completed the stop
    included, as usage counts it), when the stop lands inside a round of five tokens: an
    oracle proposer makes every round accept four draft tokens."""
    target, draft = models
    truth = expected(models).token_ids
    tree = TreeSpec.parse("30-4-8")

    def oracle_generate(target, input_ids, video=None, *, draft, **settings):
        settings.update(tree=_room_for("30-4-8", 4), method="sparrow")
        return sparrow.generate(target, input_ids, video, draft=draft, **settings,
                                proposer=OracleProposer(draft, target, tree, truth, 4))

    # The prefill emits token 0, then rounds of 5 (tokens 1-5, 6-10, ...): a stop string that
    # token `stop_at`, mid-round, completes. (A stop token would end the round itself, as EOS.)
    text = [target.tokenizer.decode(truth[:n], skip_special_tokens=True) for n in range(len(truth) + 1)]
    stop_at = next(i for i in range(2, len(truth)) if i % 5 in (2, 3)
                   and len(text[i + 1]) == len(text[i - 1]) + 2 and text[i + 1][-2:] not in text[i])
    stop = text[stop_at + 1][-2:]
    with serving(target, draft, method="sparrow", tree=TREE, max_tokens=64,
                 generate_fn=oracle_generate) as (url, _):
        api = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        for stream in (False, True):
            response = api.chat.completions.create(
                model="tiny", messages=QUESTION, max_tokens=MAX_TOKENS, logprobs=True, stream=stream,
                stop=stop)
            if stream:
                logprobs = [e for c in response if c.choices and c.choices[0].logprobs
                            for e in c.choices[0].logprobs.content]
            else:
                logprobs = response.choices[0].logprobs.content
                assert response.model_extra["sparrow"]["accepted_lengths"][0] == 5
                assert response.usage.completion_tokens == stop_at + 1
            assert [e.token for e in logprobs] == [token_text(target.tokenizer, t)[0]
                                                   for t in truth[:stop_at + 1]]


def test_completions_logprobs_in_the_legacy_shape(api, models):
    target, _ = models
    prompt = torch.tensor([target.tokenizer("Once upon a time")["input_ids"]])
    truth = expected(models, top=3, prompt=prompt)
    done = api.completions.create(model="tiny", prompt="Once upon a time", max_tokens=MAX_TOKENS, logprobs=3)
    logprobs = done.choices[0].logprobs
    assert logprobs.token_logprobs == [item.logprob for item in truth.logprobs]
    assert logprobs.tokens == [token_text(target.tokenizer, t)[0] for t in truth.token_ids]
    assert [list(top) for top in logprobs.top_logprobs] == [
        [token_text(target.tokenizer, t)[0] for t, _ in item.top] for item in truth.logprobs]
    assert logprobs.text_offset == [sum(map(len, logprobs.tokens[:i])) for i in range(len(logprobs.tokens))]
    chunks = list(api.completions.create(model="tiny", prompt="Once upon a time", max_tokens=MAX_TOKENS,
                                         logprobs=3, stream=True))
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert [v for piece in streamed for v in piece.token_logprobs] == logprobs.token_logprobs
    assert [v for piece in streamed for v in piece.text_offset] == logprobs.text_offset


def test_n_choices_are_seeded_generations_streamed_by_index(api, models):
    target, _ = models
    truths = [expected(models, temperature=1.0, seed=5 + i) for i in range(3)]
    texts = [target.tokenizer.decode(t.token_ids, skip_special_tokens=True) for t in truths]
    assert len(set(texts)) > 1  # the seeds differ, so do the answers
    answer = api.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=MAX_TOKENS,
                                         temperature=1.0, seed=5, n=3)
    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert [c.message.content for c in answer.choices] == texts
    assert [c.model_extra["sparrow"]["token_ids"] for c in answer.choices] == [t.token_ids for t in truths]
    assert answer.usage.completion_tokens == sum(len(t.token_ids) for t in truths)
    assert answer.usage.prompt_tokens == truths[0].num_prompt_tokens
    chunks = list(api.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=MAX_TOKENS,
                                              temperature=1.0, seed=5, n=3, stream=True,
                                              stream_options={"include_usage": True}))
    streamed = ["", "", ""]
    for c in chunks:
        for choice in c.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert streamed == texts
    assert sum(1 for c in chunks for choice in c.choices if choice.finish_reason) == 3
    assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens
    greedy = api.completions.create(model="tiny", prompt="Once upon a time", max_tokens=8, n=2)
    assert greedy.choices[0].text == greedy.choices[1].text  # greedy: the same answer twice
