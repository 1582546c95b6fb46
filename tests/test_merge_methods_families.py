"""Known-answer tests for the methods outside the task-arithmetic family.

Each expected value follows from the paper's definition, worked out in the comments.
"""

from __future__ import annotations

import math

import pytest
import torch

from mergescale.merge import MergeInputError, get_method, validate_params

R2 = math.sqrt(0.5)


def run(method: str, base, experts, expert_params=None, name: str = "w", extra: dict | None = None, **params):
    m = get_method(method)
    resolved = validate_params(m, params, expert_params, n_experts=len(experts))
    gen = torch.Generator().manual_seed(0) if m.randomised else None
    return m.function(base, experts, resolved.expert_params, {**resolved.params, **(extra or {})}, gen, name)


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


# -- spherical -------------------------------------------------------------------------------
def test_slerp_quarter_circle():
    # |a| = |b| = 2, 90 degrees apart: t = 0.5 -> sin(pi/4)/sin(pi/2) * (a + b)
    out = run("slerp", t(2.0, 0.0), [t(0.0, 2.0)], t=0.5)
    torch.testing.assert_close(out, t(2 * R2, 2 * R2))
    torch.testing.assert_close(run("slerp", t(2.0, 0.0), [t(0.0, 2.0)], t=0.0), t(2.0, 0.0))
    torch.testing.assert_close(run("slerp", t(2.0, 0.0), [t(0.0, 2.0)], t=1.0), t(0.0, 2.0))


def test_slerp_colinear_is_linear():
    # cos = 1 > dot_threshold: (1 - t) a + t b
    out = run("slerp", t(1.0, 1.0), [t(3.0, 3.0)], t=0.25)
    torch.testing.assert_close(out, t(1.5, 1.5))


def test_slerp_takes_exactly_one_expert():
    assert get_method("slerp").max_experts == 1


def test_multislerp_of_two_orthogonal_units_is_the_midpoint():
    # mean direction (u1 + u2)/|u1 + u2|; the tangent parts cancel; mean norm 1
    out = run("multislerp", None, [t(1.0, 0.0), t(0.0, 1.0)])
    torch.testing.assert_close(out, t(R2, R2))
    # around a base: the same on the offsets, shifted back
    out = run("multislerp", t(1.0, 1.0), [t(2.0, 1.0), t(1.0, 2.0)])
    torch.testing.assert_close(out, t(1 + R2, 1 + R2))


def test_multislerp_uneven_weights_matches_closed_form():
    # weights 3:1 normalised to 0.75, 0.25; m = normalise(0.75 e1 + 0.25 e2)
    # tangents: e1 - (e1.m) m and e2 - (e2.m) m, combined with the weights, then the
    # exponential map cos|v| m + sin|v| v/|v|, scaled by 0.75*2 + 0.25*2 = 2
    e1, e2 = t(1.0, 0.0), t(0.0, 1.0)
    m = 0.75 * e1 + 0.25 * e2
    m = m / m.norm()
    v = 0.75 * (e1 - (e1 @ m) * m) + 0.25 * (e2 - (e2 @ m) * m)
    nv = v.norm() + 1e-8
    expected = 2 * (m * torch.cos(nv) + v * torch.sin(nv) / nv)
    out = run("multislerp", None, [2 * e1, 2 * e2], [{"weight": 3.0}, {"weight": 1.0}])
    torch.testing.assert_close(out, expected)


def test_karcher_mean_of_two_orthogonal_vectors():
    # the geodesic midpoint of e1 and e2 on the circle, times the mean norm (1 + 3) / 2
    out = run("karcher", None, [t(1.0, 0.0), t(0.0, 3.0)])
    torch.testing.assert_close(out, 2 * t(R2, R2), rtol=1e-5, atol=1e-5)


def test_karcher_three_directions_on_a_circle():
    # directions at 0, 60 and 120 degrees: the Karcher mean is at 60 degrees
    angles = [0.0, math.pi / 3, 2 * math.pi / 3]
    experts = [t(math.cos(a), math.sin(a)) for a in angles]
    out = run("karcher", None, experts, max_iter=50, tol=1e-7)
    torch.testing.assert_close(out, t(math.cos(math.pi / 3), math.sin(math.pi / 3)), rtol=1e-5, atol=1e-5)


# -- model stock ------------------------------------------------------------------------------
@pytest.mark.parametrize("tau2, expected_t", [
    ((0.0, 1.0), 0.0),  # cos 0: t = 0, keep the base
    ((1.0, 0.0), 1.0),  # cos 1: t = 2/(1+1) = 1, the average
    ((0.5, math.sqrt(3) / 2), 2 / 3),  # cos 1/2: t = 2 * 0.5 / (1 + 0.5)
])
def test_model_stock_ratio(tau2, expected_t):
    base = t(1.0, -1.0)
    tau1 = t(1.0, 0.0)
    experts = [base + tau1, base + t(*tau2)]
    mean_tau = (tau1 + t(*tau2)) / 2
    out = run("model_stock", base, experts)
    torch.testing.assert_close(out, base + expected_t * mean_tau)


def test_model_stock_filter_wise_uses_one_ratio_per_row():
    base = torch.zeros(2, 2)
    e1 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    e2 = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # row 0 orthogonal (t = 0), row 1 equal (t = 1)
    out = run("model_stock", base, [e1, e2], filter_wise=True)
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0], [1.0, 0.0]]))


# -- selection and masking -----------------------------------------------------------------------
def test_consensus_tall_masks_hand_worked():
    base = t(0.0, 0.0, 0.0)
    tau = [t(1.0, 0.0, 2.0), t(1.0, 3.0, 0.0), t(-1.0, 0.0, 0.5)]
    # MTL = [1, 3, 2.5]; with lambda_i = 1, m_i = |tau_i| > |MTL - tau_i|:
    #   m1: [1 > 0, 0 > 3, 2 > 0.5]   = [T, F, T]
    #   m2: [1 > 0, 3 > 0, 0 > 2.5]   = [T, T, F]
    #   m3: [1 > 2, 0 > 3, 0.5 > 2]   = [F, F, F]
    # votes [2, 1, 1] >= k = 2 -> keep entry 0 only: base + [1, 0, 0]
    out = run("consensus", base, tau, tall_lambda=1.0, k=2)
    torch.testing.assert_close(out, t(1.0, 0.0, 0.0))
    # k = 1 keeps entries some expert marks: MTL * [1, 1, 1]
    torch.testing.assert_close(run("consensus", base, tau, tall_lambda=1.0, k=1), t(1.0, 3.0, 2.5))


def test_magmax_picks_largest_magnitude():
    base = t(1.0, 1.0, 1.0)
    # tau1 = [1, -3, 0.5], tau2 = [-2, 1, 0.5] -> [-2, -3, 0.5] (tie: first expert)
    out = run("magmax", base, [base + t(1.0, -3.0, 0.5), base + t(-2.0, 1.0, 0.5)], **{"lambda": 0.5})
    torch.testing.assert_close(out, base + 0.5 * t(-2.0, -3.0, 0.5))


def test_sce_hand_worked():
    base = t(0.0, 0.0, 0.0)
    tau1, tau2 = t(2.0, -1.0, 0.0), t(2.0, 3.0, 1.0)
    # no selection: energies mean(tau^2) = 5/3 and 14/3 -> w = [5/19, 14/19]
    # signs of the sum [4, 2, 1]: +,+,+ ; tau1's -1 is erased
    # entry 0: (2 w1 + 2 w2) / (w1 + w2) = 2; entry 1: 3 w2 / w2 = 3; entry 2: 1 w2 / w2 = 1
    torch.testing.assert_close(run("sce", base, [tau1, tau2]), t(2.0, 3.0, 1.0))
    # select_topk 0.5: variances [0, 4, 0.25], 2 non-zero -> keep 1 entry (index 1):
    # taus [[0, -1, 0], [0, 3, 0]]; w = [1/3, 3] / (10/3); -1 erased -> [0, 3, 0]
    torch.testing.assert_close(run("sce", base, [tau1, tau2], select_topk=0.5), t(0.0, 3.0, 0.0))


def _pcb_reference(taus: torch.Tensor, density: float, clip: float) -> torch.Tensor:
    """Direct transcription of the paper's steps with sorting (the reference code's form)."""
    n, d = taus.shape
    mag = taus.abs()
    srt = torch.sort(mag, dim=1).values
    mag = torch.clamp(mag, srt[:, int(d * clip)].unsqueeze(1), srt[:, int(d * (1 - clip)) - 1].unsqueeze(1))
    clipped = taus.sign() * mag

    def norm(x):
        lo, hi = x.min(dim=1, keepdim=True).values, x.max(dim=1, keepdim=True).values
        return (x - lo) / (hi - lo)

    score = torch.exp(n * norm(mag) ** 2) * torch.tanh(taus * taus.sum(dim=0))
    srt = torch.sort(score, dim=1).values
    scale = norm(torch.clamp(score, min=srt[:, int(d * (1 - density))].unsqueeze(1)))
    return (clipped * scale).sum(dim=0) / scale.sum(dim=0).clamp(min=1e-12)


def test_pcb_matches_the_paper_steps():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(20, 30, generator=g)
    taus = torch.randn(3, 20, 30, generator=g)
    out = run("pcb", base, [base + x for x in taus], density=0.2, clip_ratio=0.01)
    expected = base + _pcb_reference(taus.reshape(3, -1), 0.2, 0.01).reshape(20, 30)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


# -- subspace methods --------------------------------------------------------------------------------
def _outer(i: int, j: int, n: int = 4) -> torch.Tensor:
    m = torch.zeros(n, n)
    m[i, j] = 1.0
    return m


def test_tsv_of_orthogonal_tasks_is_their_sum():
    # tau1 spans e1, e2 and tau2 spans e3, e4: keeping 4/2 = 2 singular triplets each
    # loses nothing and the concatenated singular vectors are already orthonormal
    base = torch.ones(4, 4)
    tau1 = 3 * _outer(0, 0) + 1 * _outer(1, 1)
    tau2 = 2 * _outer(2, 2) + 0.5 * _outer(3, 3)
    out = run("tsv", base, [base + tau1, base + tau2])
    torch.testing.assert_close(out, base + tau1 + tau2, rtol=1e-5, atol=1e-5)


def test_tsv_truncates_each_task_to_rank_r_over_k():
    # two tasks on 4x4: each keeps its top 2 singular values (3 and 2); the 1 and 0.5
    # directions are dropped
    base = torch.zeros(4, 4)
    tau1 = 3 * _outer(0, 0) + 1 * _outer(1, 1)
    tau2 = 2 * _outer(2, 2) + 0.5 * _outer(3, 3)
    tau1 = tau1 + 0.1 * _outer(3, 3)  # a third, smallest direction is cut
    out = run("tsv", base, [tau1, tau2])
    torch.testing.assert_close(out, 3 * _outer(0, 0) + _outer(1, 1) + 2 * _outer(2, 2) + 0.5 * _outer(3, 3),
                               rtol=1e-5, atol=1e-5)


def test_tsv_and_iso_c_average_vectors():
    base = t(1.0, 2.0)
    for method in ("tsv", "iso_c"):
        torch.testing.assert_close(run(method, base, [t(3.0, 2.0), t(1.0, 4.0)]), t(2.0, 3.0))


def test_iso_c_flattens_the_spectrum():
    # summed task vector diag(3, 1): singular values -> their mean 2, so 2 * I
    base = torch.zeros(2, 2)
    out = run("iso_c", base, [torch.diag(t(3.0, 0.0)), torch.diag(t(0.0, 1.0))], **{"lambda": 0.5})
    torch.testing.assert_close(out, 0.5 * 2 * torch.eye(2), rtol=1e-5, atol=1e-6)


# -- structural ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, source", [
    ("model.layers.0.mlp.up_proj.weight", 1),  # bottom layer: second expert
    ("model.layers.1.self_attn.q_proj.weight", 0),  # middle: first expert
    ("model.layers.2.input_layernorm.weight", 0),
    ("model.layers.3.mlp.down_proj.weight", 1),  # top layer
    ("model.embed_tokens.weight", 1),  # outside the layers: outside_layers=second
    ("lm_head.weight", 1),
])
def test_layer_swap_by_layer_index(name, source):
    experts = [t(0.0), t(1.0)]
    out = run("layer_swap", None, experts, name=name, extra={"num_layers": 4}, n_bottom=1, n_top=1)
    torch.testing.assert_close(out, experts[source])


def test_layer_swap_counts_layers_and_checks_bounds():
    m = get_method("layer_swap")
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(6)] + ["lm_head.weight"]
    assert m.setup(names, None) == {"num_layers": 6}
    with pytest.raises(MergeInputError, match="exceeds the 6 layers"):
        run("layer_swap", None, [t(0.0), t(1.0)], extra={"num_layers": 6}, n_bottom=4, n_top=3)
    with pytest.raises(MergeInputError, match="no transformer layers"):
        m.setup(["embed.weight"], None)


def test_passthrough_scales():
    torch.testing.assert_close(run("passthrough", None, [t(1.0, -2.0)], [{"scale": 2.0}]), t(2.0, -4.0))
