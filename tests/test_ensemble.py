"""The output-ensemble reference: averaged distributions and greedy decoding."""

import torch

from mergescale.ensemble import OutputEnsemble
from mergescale.models import TinyShape, new_llama
from mergescale.tasks import ALPHABET
from mergescale.tokenizer import build_char_tokenizer

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
