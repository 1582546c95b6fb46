"""MAP: the quadratic fit, the Pareto front and the probe design, against answers
computed here by hand or by brute force."""

import itertools

import numpy as np
import pytest
import torch

from merge_fixtures import load_state, save_tiny_llama
from mergescale.rule_methods.map_pareto import (
    MAPFit,
    fit_quadratic,
    latin_hypercube,
    n_features,
    pareto_mask,
    predict,
    search_space,
    select_spread,
    task_arithmetic_state,
)
from mergescale.merge.checkpoint import Checkpoint
from mergescale.rule_methods.opcm import load_base


def _known_quadratic(c):
    # 0.3 + 0.5 c1 - 0.2 c2 + 0.1 c3 - 0.4 c1^2 + 0.25 c1 c2 - 0.1 c1 c3 + 0.3 c2^2 + 0.05 c2 c3 - 0.2 c3^2
    c1, c2, c3 = c[:, 0], c[:, 1], c[:, 2]
    return (0.3 + 0.5 * c1 - 0.2 * c2 + 0.1 * c3 - 0.4 * c1**2 + 0.25 * c1 * c2 - 0.1 * c1 * c3
            + 0.3 * c2**2 + 0.05 * c2 * c3 - 0.2 * c3**2)


def test_quadratic_fit_recovers_a_known_quadratic_exactly():
    probes = latin_hypercube(n_features(3, True), 3, 1.0, seed=0)  # exactly as many as terms
    coef = fit_quadratic(probes, _known_quadratic(probes))
    # feature order: 1, c1, c2, c3, c1c1, c1c2, c1c3, c2c2, c2c3, c3c3
    expected = [0.3, 0.5, -0.2, 0.1, -0.4, 0.25, -0.1, 0.3, 0.05, -0.2]
    np.testing.assert_allclose(coef, expected, atol=1e-9)
    new = np.random.default_rng(1).random((50, 3)) * 2
    np.testing.assert_allclose(predict(coef, new), _known_quadratic(new), atol=1e-9)


def test_separable_fit_recovers_a_quadratic_without_cross_terms():
    probes = latin_hypercube(9, 4, 1.0, seed=3)
    y = 1 - (probes - 0.5) ** 2 @ np.array([1.0, 2.0, 0.5, 0.1]) + probes @ np.array([0.1, 0, 0.2, 0])
    coef = fit_quadratic(probes, y, interactions=False)
    np.testing.assert_allclose(coef, [1 - 0.25 - 0.5 - 0.125 - 0.025, 1.1, 2.0, 0.7, 0.1, -1, -2, -0.5, -0.1],
                               atol=1e-9)


def test_too_few_probes_is_a_clear_error():
    with pytest.raises(ValueError, match="6 terms; 5 probe"):
        fit_quadratic(np.random.default_rng(0).random((5, 2)), np.zeros(5))


def test_pareto_front_of_known_points():
    y = np.array([
        [0.9, 0.1],  # front
        [0.5, 0.5],  # front
        [0.4, 0.4],  # dominated by [0.5, 0.5]
        [0.1, 0.9],  # front
        [0.5, 0.2],  # dominated
        [0.5, 0.5],  # equal to a front point: not dominated
        [0.9, 0.05],  # dominated by [0.9, 0.1] (equal in one, worse in the other)
    ])
    assert pareto_mask(y).tolist() == [True, True, False, True, False, True, False]


def test_pareto_front_matches_brute_force():
    y = np.round(np.random.default_rng(5).random((300, 3)), 2)  # rounding makes ties
    brute = [not any(np.all(o >= p) and np.any(o > p) for o in y) for p in y]
    assert pareto_mask(y).tolist() == brute


def test_front_of_a_fitted_surrogate_and_its_spread():
    # Two tasks whose best coefficients are at opposite corners: the front runs between them.
    probes = latin_hypercube(8, 2, 1.0, seed=0)
    scores = np.stack([0.2 + 0.7 * probes[:, 0] - 0.3 * probes[:, 1] ** 2,
                       0.2 + 0.7 * probes[:, 1] - 0.3 * probes[:, 0] ** 2], axis=1)
    fit = MAPFit(["a", "b"], probes, scores, interactions=True)
    assert min(fit.r2) == pytest.approx(1.0)
    coefs, pred = fit.front(search_space(2, 1.0, 21, seed=0))
    assert len(coefs) > 5 and pareto_mask(pred).all()  # the front is its own front
    assert pred[:, 0].max() == pytest.approx(0.9) and pred[:, 1].max() == pytest.approx(0.9)
    chosen = select_spread(pred, 3)
    assert chosen[0] == int(np.argmax(pred.mean(axis=1)))
    # the farthest points are the ends: one task at its best, the other clipped to 0
    ends = {tuple(np.round(pred[i], 6)) for i in chosen[1:]}
    assert ends == {(0.9, 0.0), (0.0, 0.9)}


def test_latin_hypercube_fills_every_stratum():
    pts = latin_hypercube(7, 3, 2.0, seed=1)
    assert pts.shape == (7, 3) and (pts >= 0).all() and (pts <= 2).all()
    for j in range(3):
        assert sorted(np.floor(pts[:, j] / 2 * 7).astype(int)) == list(range(7))


def test_task_arithmetic_state_is_the_weighted_sum(tmp_path):
    base_dir = save_tiny_llama(tmp_path / "base", seed=0)
    dirs = [save_tiny_llama(tmp_path / f"e{i}", seed=i + 1, like=base_dir) for i in range(2)]
    base = load_base(Checkpoint(base_dir))
    state = task_arithmetic_state(base, [Checkpoint(d) for d in dirs], [0.3, 0.8])
    b, e0, e1 = load_state(base_dir), load_state(dirs[0]), load_state(dirs[1])
    for n in b:
        torch.testing.assert_close(state[n], b[n] + 0.3 * (e0[n] - b[n]) + 0.8 * (e1[n] - b[n]))


def _front_table(k, seed=0):
    import pandas as pd

    from mergescale.rule_methods.map_pareto import long_rows

    rng = np.random.default_rng(seed)
    tasks = [f"t{i}" for i in range(k)]
    probes, front, chosen = rng.random((5, k)), rng.random((9, k)), rng.random((3, k))
    rows = (long_rows("probe", probes, tasks, rng.random((5, k)), rng.random((5, k)))
            + long_rows("front", front, tasks, rng.random((9, k)))
            + long_rows("selected", chosen, tasks, np.array([[0.9] * k, [0.5] * k, [0.2] * k]),
                        np.array([[0.8] * k, [0.6] * k, [0.1] * k])))
    df = pd.DataFrame(rows)
    df.insert(0, "setting", "map")
    df.insert(1, "base", "b")
    df.insert(2, "combo", f"k{k}s0")
    return df


def test_front_summary_and_figure(tmp_path):
    import pandas as pd

    from mergescale.rule_methods.map_pareto import front_summary
    from mergescale.report.plots import plot_map_front

    front = pd.concat([_front_table(2), _front_table(3, seed=1)], ignore_index=True)
    summary = front_summary(front).set_index("combo")
    assert summary.loc["k3s0", "k"] == 3 and summary.loc["k2s0", "probes"] == 5
    assert summary.loc["k3s0", "best_predicted"] == pytest.approx(0.9)
    assert summary.loc["k3s0", "best_measured"] == pytest.approx(0.8)
    assert summary.loc["k3s0", "front_measured_spread"] == pytest.approx(0.7)
    assert summary.loc["k3s0", "front_abs_error"] == pytest.approx((0.1 + 0.1 + 0.1) / 3)
    plot_map_front(front, tmp_path / "map_front.png")
    assert (tmp_path / "map_front.png").stat().st_size > 10_000 and (tmp_path / "map_front.pdf").exists()
