"""Localize-and-Stitch: the stitch against a hand computation, the dataless masks, and
the localization fit on real tiny models through the merge engine."""

import json

import torch
from safetensors.torch import load_file

from mergescale.merge import MergeRequest, get_method
from mergescale.merge.data_aware import merge_with_data
from mergescale.merge.methods.localize_stitch import top_mask
from test_merge_data_aware import trained  # noqa: F401  (the module's tiny base and experts)


def _stitch(base, experts, **params):
    m = get_method("localize_stitch")
    defaults = {h.name: h.default for h in m.hyperparameters}
    return m.function(base, experts, [{}, {}], {**defaults, "mask_files": [], **params}, None, "w")


def test_dataless_stitch_keeps_the_largest_changes_and_averages_overlaps():
    base = torch.zeros(2, 5)
    a = torch.tensor([[5.0, 0.1, 0.2, 4.0, 0.0], [0.3, 0.0, 0.0, 0.0, 0.0]])
    b = torch.tensor([[3.0, 0.0, 0.0, 0.1, 0.2], [0.0, 6.0, 0.0, 0.0, 0.0]])
    out = _stitch(base, [a, b], sparsity=0.2)  # 2 of 10 entries each
    # a keeps (0,0)=5 and (0,3)=4; b keeps (1,1)=6 and (0,0)=3; (0,0) is kept by both
    expected = torch.zeros(2, 5)
    expected[0, 0], expected[0, 3], expected[1, 1] = (5 + 3) / 2, 4.0, 6.0
    torch.testing.assert_close(out, expected)
    assert int(top_mask(torch.rand(1000), 0.1).sum()) == 100


def test_localization_fit_through_the_engine(trained, tmp_path):  # noqa: F811
    """The learned masks merge a loadable model; with every entry kept (sparsity 1) the
    result is the experts' average whatever the fit learned."""
    from transformers import AutoModelForCausalLM

    def merge(name, **params):
        out = tmp_path / name
        merge_with_data(MergeRequest(method="localize_stitch", base=trained["base"], experts=trained["experts"],
                                     out_dir=out, params={"examples": 8, "batch_size": 4, **params}, seed=0),
                        trained["data"], log=lambda m: None, fit_device="cpu")
        return out

    learned = merge("learned", sparsity=0.1)
    card = json.loads((learned / "merge_card.json").read_text())
    assert card["fit"]["dataless"] is False and card["fit"]["seconds"] > 0
    assert all(0.0 <= f <= 1.0 for f in card["fit"]["moved_from_magnitude_start"])
    model = AutoModelForCausalLM.from_pretrained(learned)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    full = load_file(str(merge("full", sparsity=1.0) / "model.safetensors"))
    experts = [load_file(str(e / "model.safetensors")) for e in trained["experts"]]
    for name, t in full.items():
        torch.testing.assert_close(t, (experts[0][name] + experts[1][name]) / 2, rtol=1e-5, atol=1e-6)
    base = load_file(str(trained["base"] / "model.safetensors"))
    sparse = load_file(str(learned / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"
    changed = (sparse[name] != base[name]).float().mean()
    assert 0.0 < changed <= 0.2 + 1e-6  # at most the two experts' 10% each
