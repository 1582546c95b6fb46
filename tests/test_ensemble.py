"""The output-ensemble reference: averaged distributions and greedy decoding."""

from pathlib import Path

import torch

from mergescale.evaluate.ensemble import OutputEnsemble
from mergescale.models.llama import TinyShape, new_llama
from mergescale.tasks import ALPHABET
from mergescale.models.tokenizer import build_char_tokenizer

SHAPE = TinyShape(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)


def _models(n):
    tok = build_char_tokenizer(ALPHABET)
    return [new_llama(SHAPE, tok, seed=i).eval() for i in range(n)], tok


def _batch(tok, texts):
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc["input_ids"], enc["attention_mask"]


def test_log_probs_are_the_log_of_the_mean_probability():
    models, tok = _models(2)
    ids, mask = _batch(tok, ["first abc=", "last xy="])
    got = OutputEnsemble(models).log_probs(ids, mask)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        probs = [torch.softmax(m(input_ids=ids, attention_mask=mask, position_ids=pos).logits, -1)
                 for m in models]
    torch.testing.assert_close(got, torch.log((probs[0] + probs[1]) / 2), atol=1e-5, rtol=1e-5)
    assert torch.allclose(got.exp().sum(-1), torch.ones(got.shape[:2]), atol=1e-5)


def test_one_member_decodes_like_hf_greedy_generate():
    (model,), tok = _models(1)
    ids, mask = _batch(tok, ["first abc=", "reverse hello="])  # different lengths: left padding
    ours = OutputEnsemble([model]).greedy_generate(ids, mask, 6, stop_ids=set(), pad_id=tok.pad_token_id)
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=None)
    assert torch.equal(ours, ref)


def test_identical_members_equal_one_member():
    (model,), tok = _models(1)
    ids, mask = _batch(tok, ["first abc="])
    one = OutputEnsemble([model]).greedy_generate(ids, mask, 5, set(), tok.pad_token_id)
    three = OutputEnsemble([model, model, model]).greedy_generate(ids, mask, 5, set(), tok.pad_token_id)
    assert torch.equal(one, three)


def test_lm_eval_scores_a_one_member_ensemble_like_its_member(tmp_path, monkeypatch):
    """Through the real harness: the ensemble spec of one expert scores every example
    exactly as that expert's checkpoint does."""
    from mergescale.evaluate.ensemble import write_ensemble_spec
    from mergescale.evaluate.harness import EvalRequest, evaluate
    from mergescale.models.llama import save_model
    from mergescale.tasks import make_splits, write_jsonl, write_task_yaml

    monkeypatch.chdir(tmp_path)  # task YAMLs point at data relative to the working dir
    rows = make_splits("last_letter", {"train": 5, "validation": 5, "test": 24}, seed=0)["test"]
    write_jsonl(rows, Path("data/last_letter/test.jsonl"))
    write_task_yaml("last_letter", "test", "data/last_letter/test.jsonl", Path("tasks/last_letter_test.yaml"))
    (model,), tok = _models(1)
    save_model(model, tok, Path("expert"))
    write_ensemble_spec(Path("ensemble"), [Path("expert")])

    def scores(model_dir):
        out = evaluate(EvalRequest(model_dir=Path(model_dir), task_dir=Path("tasks"),
                                   tasks=(("last_letter", "test"),), batch_size=8, device="cpu"),
                       log=lambda *_: None)
        return out["scores"][0]

    single, ensemble = scores("expert"), scores("ensemble")
    assert ensemble["n"] == single["n"] == 24
    assert ensemble["correct"] == single["correct"] and ensemble["value"] == single["value"]
