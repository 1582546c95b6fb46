"""OPCM and the sequential baselines: known answers and properties, computed here
independently of src/mergescale/rule_methods/opcm.py."""

import math

import pytest
import torch

from merge_fixtures import load_state, save_tiny_llama
from mergescale.merge.checkpoint import Checkpoint
from mergescale.rule_methods.opcm import (
    OPCM,
    SequentialAverage,
    SequentialTaskArithmetic,
    add_expert,
    arrival_orders,
    load_base,
    merge_in_order,
    project_away,
)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("opcm")
    base = save_tiny_llama(root / "base", seed=0)
    experts = {f"t{i}": save_tiny_llama(root / f"e{i}", seed=i + 1, like=base, noise=0.05) for i in range(4)}
    return base, experts


def _norm(tensors):
    return math.sqrt(sum(float(t.double().square().sum()) for t in tensors))


def test_one_expert_returns_that_expert(tiny_models):
    base_dir, experts = tiny_models
    base = load_base(Checkpoint(base_dir))
    merged = merge_in_order(base, {"t0": Checkpoint(experts["t0"])}, ["t0"], alpha=0.5).state_dict()
    expert = load_state(experts["t0"])
    assert set(merged) == set(expert)
    for name, t in expert.items():
        torch.testing.assert_close(merged[name], t, rtol=0, atol=1e-6, msg=name)


def _block(rows, cols, seed, shape=(6, 8)):
    g = torch.Generator().manual_seed(seed)
    t = torch.zeros(shape)
    t[rows[0]:rows[1], cols[0]:cols[1]] = torch.randn(rows[1] - rows[0], cols[1] - cols[0], generator=g)
    return t


def test_orthogonal_task_vectors_give_task_arithmetic():
    # Task vectors with disjoint row and column supports are orthogonal in both the
    # column and the row space, so no projection removes anything: OPCM is the sum of
    # task vectors, rescaled to the experts' mean norm (task arithmetic with that lambda).
    base = {"layer.weight": torch.randn(6, 8, generator=torch.Generator().manual_seed(9)),
            "norm.weight": torch.ones(5)}
    taus = [
        {"layer.weight": _block((0, 2), (0, 3), 1), "norm.weight": torch.tensor([1., 0, 0, 0, 0])},
        {"layer.weight": _block((2, 4), (3, 5), 2), "norm.weight": torch.tensor([0., 2, 0, 0, 0])},
        {"layer.weight": _block((4, 6), (5, 8), 3), "norm.weight": torch.tensor([0., 0, 0, 3, 0])},
    ]
    opcm = OPCM(base, alpha=0.5)
    for tau in taus:
        for name, t in tau.items():
            opcm.add_tensor(name, t)
        opcm.finish_expert()
    total = {n: sum(tau[n] for tau in taus) for n in base}
    lam = sum(_norm(tau.values()) for tau in taus) / len(taus) / _norm(total.values())
    merged = opcm.state_dict()
    for n in base:
        torch.testing.assert_close(merged[n], base[n] + lam * total[n])


def _reference_projection(update, tau, alpha):
    # The authors' formulation: full SVD, zero the leading block and the diagonal of U^T tau V.
    u, s, vh = torch.linalg.svd(update.double(), full_matrices=True)
    v = vh.T
    split = int((s.cumsum(0) / s.sum() > alpha).float().argmax())
    p = u.T @ tau.double() @ v
    p.diagonal().fill_(0)
    p[:split, :split] = 0
    return (u @ p @ v.T).float()


@pytest.mark.parametrize("shape", [(8, 8), (12, 5), (5, 12)])
@pytest.mark.parametrize("alpha", [0.3, 0.6, 0.95])
def test_projection_matches_the_reference_formulation_for_full_rank_updates(shape, alpha):
    g = torch.Generator().manual_seed(shape[0] * 100 + int(alpha * 10))
    update, tau = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    torch.testing.assert_close(project_away(update, tau, alpha), _reference_projection(update, tau, alpha),
                               rtol=1e-4, atol=1e-4)


def test_projection_leaves_nothing_in_the_principal_block():
    g = torch.Generator().manual_seed(0)
    update = torch.randn(10, 6, generator=g) @ torch.diag(torch.tensor([10., 5, 1, .5, .1, .05]))
    tau = torch.randn(10, 6, generator=g)
    cleaned = project_away(update, tau, alpha=0.7)
    u, s, vh = torch.linalg.svd(update, full_matrices=False)
    r = int((s.cumsum(0) / s.sum() > 0.7).float().argmax())
    assert r >= 1
    assert torch.allclose(u[:, :r].T @ cleaned @ vh[:r].T, torch.zeros(r, r), atol=1e-5)
    assert torch.allclose(torch.diagonal(u.T @ cleaned @ vh.T), torch.zeros(6), atol=1e-5)


def test_merged_norm_stays_at_the_mean_expert_norm(tiny_models):
    base_dir, experts = tiny_models
    base = load_base(Checkpoint(base_dir))
    opcm, total = OPCM(base, alpha=0.5), SequentialTaskArithmetic(base, 1.0)
    norms = []
    for task in sorted(experts):
        add_expert([opcm, total], base, Checkpoint(experts[task]))
        expert = load_state(experts[task])
        norms.append(_norm(expert[n].float() - base[n] for n in base))
        merged = opcm.state_dict()
        merged_norm = _norm(merged[n] - base[n] for n in base)
        assert merged_norm == pytest.approx(sum(norms) / len(norms), rel=1e-5)
    summed = total.state_dict()
    # a plain sum of four near-orthogonal task vectors grows about like sqrt(4)
    assert _norm(summed[n] - base[n] for n in base) > 1.8 * sum(norms) / len(norms)


def test_state_does_not_grow_with_experts(tiny_models):
    base_dir, experts = tiny_models
    base = load_base(Checkpoint(base_dir))
    mergers = [OPCM(base), SequentialAverage(base), SequentialTaskArithmetic(base, 0.5)]
    sizes = []
    for task in sorted(experts):
        add_expert(mergers, base, Checkpoint(experts[task]))
        sizes.append([m.state_bytes() for m in mergers])
    assert all(s == sizes[0] for s in sizes)
    n_float = sum(t.numel() * 4 for t in base.values() if t.is_floating_point())
    assert sizes[0] == [n_float] * 3  # one running update per tensor, nothing per expert


def test_sequential_average_is_the_mean_of_experts(tiny_models):
    base_dir, experts = tiny_models
    base = load_base(Checkpoint(base_dir))
    avg = SequentialAverage(base)
    for task in sorted(experts):
        add_expert([avg], base, Checkpoint(experts[task]))
    states = [load_state(experts[t]) for t in sorted(experts)]
    merged = avg.state_dict()
    for n in base:
        torch.testing.assert_close(merged[n], sum(s[n].float() for s in states) / len(states), atol=1e-6, rtol=0)


def test_arrival_orders_are_seeded_distinct_and_start_with_the_given_order():
    tasks = ["a", "b", "c"]
    orders = arrival_orders(tasks, 4, seed=0)
    assert orders[0] == tasks and len(orders) == 4
    assert len({tuple(o) for o in orders}) == 4 and all(sorted(o) == tasks for o in orders)
    assert orders == arrival_orders(tasks, 4, seed=0)
    assert len(arrival_orders(["a", "b"], 5, seed=0)) == 2  # only two permutations exist


def test_continual_curves_are_normalised_by_each_tasks_expert(tmp_path):
    import pandas as pd

    from mergescale.rule_methods.opcm import continual_normalized
    from mergescale.report.plots import plot_continual

    rows = []
    for method, scores in (("opcm", [0.8, 0.6, 0.3]), ("average", [0.8, 0.4, 0.2])):
        rows += [
            {"method": method, "order": 0, "step": 1, "task": "a", "score": scores[0]},
            {"method": method, "order": 0, "step": 2, "task": "a", "score": scores[1]},
            {"method": method, "order": 0, "step": 2, "task": "b", "score": scores[2]},
            {"method": method, "order": 0, "step": 2, "task": "z", "score": 0.5},  # expert scores 0: left out
        ]
    curves = pd.DataFrame(rows).assign(setting="opcm", base="m", combo="k2s0")
    norm = continual_normalized(curves, {("m", "a"): 0.8, ("m", "b"): 0.5, ("m", "z"): 0.0})
    got = norm.set_index(["method", "step"]).held_in_normalized
    assert got[("opcm", 1)] == pytest.approx(1.0)
    assert got[("opcm", 2)] == pytest.approx((0.6 / 0.8 + 0.3 / 0.5) / 2)
    assert got[("average", 2)] == pytest.approx((0.4 / 0.8 + 0.2 / 0.5) / 2)
    assert set(norm.k) == {2} and set(norm.tasks) == {1, 2}
    plot_continual(norm, tmp_path / "continual.png")
    assert (tmp_path / "continual.png").stat().st_size > 10_000
