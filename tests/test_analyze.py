"""`sparrow analyze`: the visual cut against an independent computation, the drift against
transformers' own hidden states, the attention record against a uniform-attention draft, and
the run (resume, report, errors)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from sparrow.analyze import (
    RECORDS,
    MassRecord,
    VisualCut,
    default_layers,
    forced_logits,
    parse_layers,
    record_attention,
    run_analysis,
    truncated,
)
from sparrow.bench import cases_from_prompts
from sparrow.draft import init_draft
from sparrow.errors import ConfigError
from sparrow.training.prompts import read_prompts


@pytest.fixture(scope="module")
def target():
    from sparrow.targets import load_target

    return load_target("tiny:llava_onevision")


@pytest.fixture
def prompt(target, video_file):
    from sparrow.api import prepare_video
    from sparrow.video.prompt import build_video_prompt

    video = prepare_video(target, video_file(8, 3), num_frames=8)
    ids = build_video_prompt(target.tokenizer, target.config, video, "What happens in the video?")
    return ids.reshape(-1), video


def _oracle_logits(target, ids, video, layer: int) -> torch.Tensor:
    """The cut computed another way, on the model as transformers gives it: the full model's
    states after `layer` layers, then the remaining layers run on the text positions alone
    (visual rows dropped, original positions kept), causal among them."""
    with target.unwrapped() as model:
        model.config.get_text_config()._attn_implementation = "eager"
        try:
            inputs = dict(video.model_kwargs())
            positions = torch.arange(ids.shape[0])[None]
            out = model(input_ids=ids[None], position_ids=positions, output_hidden_states=True,
                        **inputs)
            text = ids != target.video_token_id()
            h = out.hidden_states[layer][:, text]  # (1, n, d)
            lm = model.model.language_model
            kept = positions[:, text]
            cos_sin = lm.rotary_emb(h, kept)
            n = h.shape[1]
            mask = torch.full((n, n), torch.finfo(h.dtype).min).triu(1)[None, None]
            for block in lm.layers[layer:]:
                h = block(h, attention_mask=mask, position_ids=kept, position_embeddings=cos_sin)
                h = h[0] if isinstance(h, tuple) else h
            logits = model.lm_head(lm.norm(h))[0].float()
        finally:
            model.config.get_text_config()._attn_implementation = target._attention
    full = torch.zeros(ids.shape[0], logits.shape[-1])
    full[text] = logits
    return full, text


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_the_cut_equals_running_the_later_layers_without_the_video(target, prompt, layer):
    ids, video = prompt
    assert layer <= target.num_layers
    target.prefill(ids, video)
    visual = ids == target.video_token_id()
    end = int(visual.nonzero()[-1]) + 1
    prefix = truncated(target.snapshot(), end)
    got = forced_logits(target, ids, video, prefix, VisualCut(layer, visual))  # positions end..
    want, text = _oracle_logits(target, ids, video, layer)
    assert got.shape[0] == ids.shape[0] - end and bool(text[end:].all())  # the text after the video
    torch.testing.assert_close(got, want[end:], rtol=1e-4, atol=1e-4)
    if layer < target.num_layers:  # the cut matters: not the uncut model's logits
        uncut = forced_logits(target, ids, video, prefix, VisualCut(target.num_layers, visual))
        assert not torch.allclose(uncut, got, atol=1e-3)


def test_generation_under_the_cut_follows_the_cut_models_argmax(target, prompt):
    """Decode steps (one query over the cache) are cut too: the greedy answer under the cut is
    the independent computation's argmax, token after token."""
    from sparrow.analyze import visual_cut
    from sparrow.speculative.generate import generate

    ids, video = prompt
    layer = 1
    target.prefill(ids, video)
    visual = ids == target.video_token_id()
    prefix = truncated(target.snapshot(), int(visual.nonzero()[-1]) + 1)
    with visual_cut(target, VisualCut(layer, visual)):
        tokens = generate(target, ids[None], video, max_new_tokens=6, eos_token_ids=[],
                          prefix=prefix).token_ids
    want, running = [], ids
    for _ in range(6):
        logits, _ = _oracle_logits(target, running, video, layer)
        want.append(int(logits[-1].argmax()))
        running = torch.cat([running, torch.tensor(want[-1:])])
    assert tokens == want
    assert tokens != generate(target, ids[None], video, max_new_tokens=6, eos_token_ids=[]).token_ids


def test_drift_is_cosine_to_the_input_embedding_per_layer(target, prompt):
    from sparrow.analyze import _drift

    ids, video = prompt
    out = target.prefill(ids, video, layers=tuple(range(target.num_layers + 1)))
    drift = _drift(out.layer_hidden, out.visual_mask, target.num_layers)
    with target.unwrapped() as model:
        states = model(input_ids=ids[None], output_hidden_states=True,
                       **video.model_kwargs()).hidden_states
    visual = out.visual_mask
    for row in drift[:-1]:  # transformers' last entry is after the final norm; ours before it
        state, base = states[row["layer"]][0].detach(), states[0][0].detach()
        cos = F.cosine_similarity(state, base, dim=-1)
        assert row["visual"] == pytest.approx(float(cos[visual].mean()), abs=1e-4)
        assert row["text"] == pytest.approx(float(cos[~visual].mean()), abs=1e-4)
        centered = F.cosine_similarity(state - state.mean(0), base - base.mean(0), dim=-1)
        assert row["visual_centered"] == pytest.approx(float(centered[visual].mean()), abs=1e-4)
        assert row["text_centered"] == pytest.approx(float(centered[~visual].mean()), abs=1e-4)
    assert drift[0]["visual"] == pytest.approx(1.0) and drift[0]["text"] == pytest.approx(1.0)


def test_record_attention_puts_the_mass_where_the_softmax_does():
    class Module:
        layer_idx = 0

    torch.manual_seed(0)
    d, length = 8, 10
    visual = torch.zeros(6, dtype=torch.bool)
    visual[2:5] = True  # slots 2-4 of the prompt; slots 6.. are generated text
    key = torch.randn(1, 1, length, d)
    query = key[:, :, 3:4].repeat(1, 2, 1, 1)  # two heads leaning to slot 3
    value = torch.randn(1, 1, length, d)
    record = MassRecord(visual)
    record_attention(Module(), query, key, value, None, record=record)
    weights = (query @ key.transpose(-1, -2) * d**-0.5).softmax(-1)
    assert record.mass[0] == pytest.approx(float(weights[..., 2:5].sum(-1).mean()), abs=1e-6)
    assert 0.3 < record.mass[0] < 0.99 and record.share[0] == pytest.approx(3 / length)
    prompt_pass = MassRecord(visual)
    record_attention(Module(), key[:, :, :4].repeat(1, 2, 1, 1), key[:, :, :4], value[:, :, :4], None,
                     record=prompt_pass)
    assert prompt_pass.mass == []  # the causal pass over the prompt is not a decoding query


def test_a_uniform_draft_puts_the_visual_share_on_visual_slots(target, prompt):
    from sparrow.analyze import recording
    from sparrow.speculative.generate import generate
    from sparrow.speculative.tree import parse_tree

    ids, video = prompt
    draft = init_draft(target, "eagle", seed=0)
    with torch.no_grad():
        draft.layer.self_attn.q_proj.weight.zero_()  # every score 0: uniform over what is visible
    record = MassRecord(ids == target.video_token_id())
    with recording(draft, record):
        generate(target, ids, video, method="eagle", draft=draft, tree=parse_tree("5-3-2"), max_new_tokens=8)
    assert record.mass and len(record.mass) == len(record.share)
    for mass, share in zip(record.mass, record.share, strict=True):
        assert mass == pytest.approx(share, abs=1e-5)
    visual = int((ids == target.video_token_id()).sum())
    assert 0.5 * visual / ids.shape[0] < record.share[0] <= visual / ids.shape[0]


def test_run_resumes_and_reports(target, video_file, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"question": "What happens?", "video": video_file(8, i)}) + "\n"
                               for i in range(2)))
    cases = cases_from_prompts(target, read_prompts(prompts), [100])
    draft = init_draft(target, "eagle", seed=1)
    layers = [0, 1, target.num_layers]
    out = tmp_path / "an"
    report = run_analysis(target, cases, cases, out, draft=draft, draft_name="eagle", layers=layers,
                          tree="5-3-2",
                          max_new_tokens=10)
    records = [json.loads(line) for line in (out / RECORDS).read_text().splitlines()]
    assert sorted((r["kind"], r["index"]) for r in records) == [
        ("dilution", 0), ("dilution", 1), ("drift", 0), ("drift", 1), ("removal", 0), ("removal", 1)]
    full = [e for e in report["removal"] if e["layer"] == target.num_layers][0]
    assert full["agreement"] == pytest.approx(1.0) and full["identical"] == 2  # nothing removed
    assert report["findings"]["identical_from"] is not None
    assert report["findings"]["keeps_95_by"] == "agreement"  # no facts for these videos
    assert [e["layer"] for e in report["drift"]] == list(range(target.num_layers + 1))
    assert 0 <= report["dilution"][0]["mass"] <= 1
    for name in ("analyze.json", "analyze.md", "analyze.png"):
        assert (out / name).stat().st_size > 0
    # a lost record is measured again, alone
    (out / RECORDS).write_text("".join(json.dumps(r) + "\n" for r in records[:-1]))
    run_analysis(target, cases, cases, out, draft=draft, draft_name="eagle", layers=layers, tree="5-3-2",
                 max_new_tokens=10)
    again = [json.loads(line) for line in (out / RECORDS).read_text().splitlines()]
    assert len(again) == len(records) and again[:-1] == records[:-1]
    assert _key(again[-1]) == _key(records[-1])


def _key(record):
    return record["kind"], record["length"], record["index"]


def test_findings_read_the_curves():
    from sparrow.analyze import findings

    curve = [{"layer": x, "videos": 2, "identical": 2 if x >= 4 else 0, "agreement": 0.9,
              "score": 0.8 if x >= 3 else 0.1} for x in range(6)]
    curve[5]["score"] = 0.8
    profile = [{"layer": x, "visual": 1 - 0.2 * x, "visual_centered": 1 - 0.3 * x} for x in range(6)]
    got = findings(curve, profile, score_full=0.8)
    assert got == {"identical_from": 4, "keeps_95": 3, "keeps_95_by": "score",
                   "visual_cosine_below_0_25": 4, "visual_centered_cosine_below_0_25": 3}


def test_layers_parse_and_default():
    assert default_layers(5) == [0, 2, 4, 5]
    assert parse_layers("3, 0,5", 5) == [0, 3, 5]
    for bad in ("", "a", "-1", "6"):
        with pytest.raises(ConfigError, match="--layers"):
            parse_layers(bad, 5)


def test_cli_refuses_a_draft_that_never_sees_the_video(tmp_path, video_file, capsys):
    from sparrow.cli import main
    from sparrow.targets import load_target

    init_draft(load_target("tiny:llava_onevision"), "sparrow", seed=0).save(tmp_path / "s")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"question": "What?", "video": video_file(8, 0)}) + "\n")
    code = main(["analyze", "--target", "tiny:llava_onevision", "--draft", str(tmp_path / "s"),
                 "--prompts", str(prompts), "--out", str(tmp_path / "o")])
    assert code == 2 and "decodes in sparrow mode" in capsys.readouterr().err
    assert not (tmp_path / "o" / RECORDS).exists()


def test_reference_score_reads_the_cases_own_video():
    """The removal score of a reference case is against its own evaluation video's facts: the
    true description of that video scores 1, another video's scores lower."""
    from sparrow import fixture
    from sparrow.bench import Case
    from sparrow.reference import synthetic
    from sparrow.reference.eval_target import eval_scene

    case = Case(500, 2, "Describe the video in detail.", None, 12)
    own = synthetic.describe(synthetic.scene_facts(eval_scene(synthetic.EVAL_SEED_START + 2, 12)))
    other = synthetic.describe(synthetic.scene_facts(eval_scene(synthetic.EVAL_SEED_START + 3, 12)))
    assert fixture.reference_score(case, own) == pytest.approx(1.0)
    assert fixture.reference_score(case, other) < 0.8
