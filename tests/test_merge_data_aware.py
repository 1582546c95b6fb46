"""Data-aware merging: statistics, known answers of each method, and real merges.

Known answers are computed independently here: RegMean of one linear layer is the least
squares fit of every expert's outputs on its own inputs (torch.linalg.lstsq on the
stacked data); Fisher merging with equal Fishers is averaging; AdaMerging moves its
coefficients the way that lowers entropy on a model where that way is known.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from mergescale.merge import MergeInputError, MergeRequest, get_method, run_merge
from mergescale.merge.data_aware import exact_match, merge_with_data
from mergescale.merge.methods.adamerging import learn_coefficients, mean_entropy
from mergescale.merge.methods.greedy_soup import greedy_order
from mergescale.models.llama import load_model
from mergescale.merge.statistics import (FISHER_FILE, GRAM_FILE, STATS_CARD, TOKENS_KEY, GramCollector, compute_and_save,
                              compute_statistics)
from mergescale.training.stages import finetune, pretrain_base
from mergescale.tasks import make_splits, write_jsonl

NAME = "model.layers.0.mlp.up_proj.weight"


def merge_fn(method: str, experts, stats, **params):
    m = get_method(method)
    defaults = {h.name: h.default for h in m.hyperparameters if not h.per_expert}
    per_expert = [{h.name: h.default for h in m.hyperparameters if h.per_expert} for _ in experts]
    return m.function(None, experts, per_expert, {**defaults, **params}, None, NAME, stats=stats)


# -- RegMean ----------------------------------------------------------------------------


def test_regmean_single_linear_equals_least_squares():
    g = torch.Generator().manual_seed(0)
    n_in, n_out = 6, 4
    xs = [torch.randn(n, n_in, generator=g, dtype=torch.float64) for n in (20, 35, 12)]
    ws = [torch.randn(n_out, n_in, generator=g) for _ in xs]
    grams = [x.T @ x for x in xs]
    # Independent: one least squares problem over all experts' stacked inputs and outputs.
    stacked_x = torch.cat(xs)
    stacked_y = torch.cat([x @ w.double().T for x, w in zip(xs, ws)])
    expected = torch.linalg.lstsq(stacked_x, stacked_y).solution.T
    out = merge_fn("regmean", ws, [{"gram": gm.float()} for gm in grams], alpha=1.0)
    torch.testing.assert_close(out, expected.float(), rtol=1e-4, atol=1e-4)


def test_regmean_alpha_zero_is_a_per_column_weighted_average_and_vectors_are_averaged():
    g = torch.Generator().manual_seed(1)
    ws = [torch.randn(3, 5, generator=g) for _ in range(2)]
    grams = [torch.diag(torch.rand(5, generator=g) + 0.1) + 0.3 for _ in range(2)]
    out = merge_fn("regmean", ws, [{"gram": gm} for gm in grams], alpha=0.0)
    d = [torch.diagonal(gm) for gm in grams]  # alpha=0 keeps only the diagonals
    torch.testing.assert_close(out, (ws[0] * d[0] + ws[1] * d[1]) / (d[0] + d[1]))
    vs = [torch.randn(5, generator=g) for _ in range(2)]
    torch.testing.assert_close(merge_fn("regmean", vs, [{"gram": None}] * 2), (vs[0] + vs[1]) / 2)


def test_gram_collector_counts_only_real_tokens():
    g = torch.Generator().manual_seed(2)
    layer = torch.nn.Linear(4, 3)
    x = torch.randn(2, 5, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    collector = GramCollector({"lin.weight": layer})
    collector.mask = mask
    layer(x)
    collector.remove()
    real = torch.cat([x[0, :3], x[1]])
    torch.testing.assert_close(collector.grams["lin.weight"], real.T @ real)
    layer(x)  # hooks removed: nothing more is added
    torch.testing.assert_close(collector.grams["lin.weight"], real.T @ real)


# -- Fisher -----------------------------------------------------------------------------


def test_fisher_with_equal_fishers_is_averaging():
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(7, 5, generator=g) for _ in range(3)]
    f = torch.rand(7, 5, generator=g)
    out = merge_fn("fisher", xs, [{"fisher": f.clone()} for _ in xs])
    torch.testing.assert_close(out, sum(xs) / 3)


def test_fisher_follows_the_confident_expert():
    a, b = torch.zeros(4), torch.ones(4)
    fa = torch.tensor([100.0, 1.0, 0.0, 3.0])
    fb = torch.tensor([0.0, 1.0, 0.0, 1.0])
    out = merge_fn("fisher", [a, b], [{"fisher": fa}, {"fisher": fb}])
    # entry 0: only a is informed; 1: equal; 2: nobody (plain average); 3: 3:1 for a
    torch.testing.assert_close(out, torch.tensor([0.0, 0.5, 0.5, 0.25]), atol=1e-6, rtol=0)


# -- AdaMerging -------------------------------------------------------------------------


def test_adamerging_moves_lambda_towards_lower_entropy():
    # A linear "model": logits = x @ W^T. Base W = 0 predicts uniformly (maximal entropy);
    # task vector 1 sharpens the prediction, so its lambda must grow; task vector 2 changes
    # a tensor the logits never use, so its layer-wise lambda gets no gradient.
    g = torch.Generator().manual_seed(4)
    x = torch.randn(16, 5, generator=g)
    base = {"w": torch.zeros(5, 5), "unused": torch.zeros(3)}
    taus = [{"w": 3 * torch.eye(5), "unused": torch.zeros(3)},
            {"w": torch.zeros(5, 5), "unused": torch.ones(3)}]

    def logits_fn(params, batch):
        return batch @ params["w"].T

    lam, history = learn_coefficients(logits_fn, base, taus, [x], init=0.3, steps=10, lr=0.05, layerwise=True)
    assert lam.shape == (2, 2)
    assert lam[0, 0] > 0.3  # the sharpening task vector is weighted up
    assert lam[1, 0] == pytest.approx(0.3) and lam[1, 1] == pytest.approx(0.3)  # no gradient
    assert history[-1] < history[0]
    # the entropy the fit reports is the entropy of that model
    assert history[0] == pytest.approx(float(mean_entropy(x @ (0.3 * 3 * torch.eye(5)).T)), rel=1e-5)
    lam_tw, _ = learn_coefficients(logits_fn, base, taus, [x], init=0.3, steps=10, lr=0.05, layerwise=False)
    assert lam_tw.shape == (2,) and lam_tw[0] > 0.3


# -- greedy soup -------------------------------------------------------------------------


def test_greedy_soup_adds_in_score_order_while_not_worse():
    scores = [0.2, 0.9, 0.5, 0.7]
    soups = {(1, 3): 0.95, (1, 3, 2): 0.6, (1, 3, 0): 0.95}
    tried = []

    def score_soup(indices):
        tried.append(tuple(indices))
        return soups[tuple(indices)]

    soup, history = greedy_order(scores, score_soup)
    assert tried == [(1, 3), (1, 3, 2), (1, 3, 0)]  # by decreasing individual score
    assert soup == [0, 1, 3]  # 2 made it worse; 0 tied (the paper keeps ties)
    assert [h["kept"] for h in history] == [True, True, False, True]


# -- real models: statistics and merges through the engine -----------------------------------

SHAPE = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
TASKS = ("last_letter", "next_letter")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny char-level base, two briefly fine-tuned experts, their validation data and statistics."""
    root = tmp_path_factory.mktemp("data_aware")
    torch.set_num_threads(1)
    train, valid = {}, {}
    for task in TASKS:
        splits = make_splits(task, {"train": 400, "validation": 24, "test": 10})
        write_jsonl(splits["train"], root / task / "train.jsonl")
        write_jsonl(splits["validation"], root / task / "validation.jsonl")
        train[task], valid[task] = root / task / "train.jsonl", root / task / "validation.jsonl"
    quiet = lambda m: None  # noqa: E731
    base = root / "base"
    pretrain_base(SHAPE, {"steps": 30, "batch_size": 32}, train, base, log=quiet)
    experts, stats = [], []
    for task in TASKS:
        out = root / "experts" / task
        finetune(base, {"steps": 30, "batch_size": 32, "lr": 3e-3}, {task: train[task]}, out, "finetune_expert",
                 log=quiet)
        experts.append(out)
        stats_dir = root / "stats" / task
        compute_and_save(out, valid[task], stats_dir, examples=16, device="cpu", log=quiet)
        stats.append(stats_dir)
    return {"root": root, "base": base, "experts": experts, "stats": stats,
            "data": [valid[t] for t in TASKS]}


def test_statistics_files_and_fisher_known_answer(trained):
    from safetensors.torch import load_file

    d = trained["stats"][0]
    card = json.loads((d / STATS_CARD).read_text())
    assert card["examples"] == 16 and card["seconds"] > 0 and card["peak_rss_bytes"] > 0
    fisher, grams = load_file(str(d / FISHER_FILE)), load_file(str(d / GRAM_FILE))
    model, tok = load_model(trained["experts"][0])
    assert set(fisher) == {n for n, _ in model.named_parameters()}
    assert set(grams) - {TOKENS_KEY} == {f"{n}.weight" for n, m in model.named_modules()
                                         if isinstance(m, torch.nn.Linear)}
    assert int(grams[TOKENS_KEY]) == card["tokens"]
    # Fisher of one example, independently: HF's own shifted mean loss times the answer length.
    row = {"prompt": "last abc=", "answer": "c"}
    f1, g1, tokens = compute_statistics(model, tok, [row])
    ids = tok(row["prompt"] + row["answer"] + "\n", add_special_tokens=False)["input_ids"]
    n_prompt = len(tok(row["prompt"], add_special_tokens=False)["input_ids"])
    labels = [-100] * n_prompt + ids[n_prompt:]
    model.zero_grad()
    loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss * (len(ids) - n_prompt)
    loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(f1[n], p.grad.square(), rtol=1e-4, atol=1e-10)
    assert tokens == len(ids)
    # Gram of lm_head's input: the final hidden states of the same text.
    hidden = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
    torch.testing.assert_close(g1["lm_head.weight"], hidden.T @ hidden, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["fisher", "regmean", "regmean_plus_plus", "adamerging",
                                    "adamerging_layerwise", "greedy_soup"])
def test_data_aware_merge_through_the_engine(trained, tmp_path, method):
    from transformers import AutoModelForCausalLM

    from mergescale.tasks import read_jsonl

    m = get_method(method)
    params = {"steps": 3} if method.startswith("adamerging") else {}
    params.update({"examples": 8} if m.needs_data else {})
    out = tmp_path / method
    result = merge_with_data(
        MergeRequest(method=method, base=trained["base"], experts=trained["experts"], out_dir=out,
                     params=params, stats=trained["stats"] if m.needs_stats_rule else None, seed=0),
        trained["data"] if m.needs_data else None, log=lambda msg: None, fit_device="cpu")
    card = json.loads((out / "merge_card.json").read_text())
    assert card["method"] == method and card["wall_time_s"] > 0 and card["peak_rss_bytes"] > 0
    if m.needs_stats_rule:
        assert [c["examples"] for c in card["stats"]["cards"]] == [16, 16]
    if m.needs_data:
        assert card["fit"]["seconds"] > 0 and card["fit"]["data"] == [str(d) for d in trained["data"]]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # scratch removed
    model = AutoModelForCausalLM.from_pretrained(out)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    _, tok = load_model(out)
    score = exact_match(model, tok, read_jsonl(trained["data"][0])[:8])
    assert 0.0 <= score <= 1.0
    assert result.card["n_tensors"] == card["n_tensors"] == len(list(model.state_dict()))


def test_regmean_plus_plus_equals_regmean_for_identical_experts(trained, tmp_path):
    # Merging copies of one expert: the merged model is that expert at every layer, so the
    # Gram matrices taken through it are the expert's own ones (the statistics pass).
    from mergescale.merge.data_aware import FitContext
    from mergescale.merge.statistics import compute_statistics as stats_of
    from safetensors.torch import load_file

    expert, data = trained["experts"][0], trained["data"][0]
    copy = tmp_path / "copy"
    shutil.copytree(expert, copy)
    ctx = FitContext(None, [expert, copy], [data, data], {"alpha": 0.9, "examples": 8, "batch_size": 3},
                     [{}, {}], 0, torch.device("cpu"), tmp_path, lambda m: None)
    fitted = get_method("regmean_plus_plus").fit(ctx)
    grams = load_file(str(fitted.stats[1] / GRAM_FILE))
    model, tok = load_model(expert)
    from mergescale.tasks import read_jsonl

    _, expected, tokens = stats_of(model, tok, read_jsonl(data)[:8])
    assert int(grams[TOKENS_KEY]) == tokens
    for name, g in expected.items():
        torch.testing.assert_close(grams[name], g, rtol=1e-4, atol=1e-3)


def test_data_aware_methods_refuse_missing_inputs(trained, tmp_path):
    with pytest.raises(MergeInputError, match="fisher reads per-expert statistics"):
        run_merge(MergeRequest(method="fisher", experts=trained["experts"], out_dir=tmp_path / "f"))
    with pytest.raises(MergeInputError, match="adamerging learns from validation data"):
        run_merge(MergeRequest(method="adamerging", base=trained["base"], experts=trained["experts"],
                               out_dir=tmp_path / "a"))
    with pytest.raises(MergeInputError, match="give one validation data file per expert"):
        merge_with_data(MergeRequest(method="greedy_soup", experts=trained["experts"], out_dir=tmp_path / "g"),
                        trained["data"][:1])
    missing = tmp_path / "nostats"
    missing.mkdir()
    with pytest.raises(MergeInputError, match=r"nostats/fisher.safetensors: statistics file missing"):
        run_merge(MergeRequest(method="fisher", experts=trained["experts"], out_dir=tmp_path / "f",
                               stats=[trained["stats"][0], missing]))
    assert not (tmp_path / "f").exists()


# -- the workflow -------------------------------------------------------------------------


@pytest.mark.slow
def test_workflow_runs_statistics_and_data_aware_merges(tmp_path):
    """compute_stats plus one statistics method and one fitted method on the smoke slice."""
    import yaml
    from transformers import AutoModelForCausalLM

    from workflow_helpers import SMOKE_CONFIG, snakemake

    config = yaml.safe_load(SMOKE_CONFIG.read_text())
    config["merge"]["methods"] = {"regmean": {"method": "regmean"},
                                  "adamerging": {"method": "adamerging", "params": {"steps": 5, "examples": 10}}}
    config["merge"]["stats"] = {"split": "validation", "examples": 10}
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    combo = "k2s0"
    targets = [f"results/evals/merged/smoke/{m}/{combo}/scores.json" for m in ("regmean", "adamerging")]
    snakemake(tmp_path, "--cores", "2", *targets, config=config_path)
    experts = sorted(p.name for p in (tmp_path / "results/stats/smoke").iterdir())
    assert len(experts) == 2  # statistics only for the two experts of the one combo asked for
    for m in ("regmean", "adamerging"):
        record = json.loads((tmp_path / f"results/evals/merged/smoke/{m}/{combo}/scores.json").read_text())
        assert all(0 <= s["value"] <= 1 for s in record["scores"])
        card = record["model_card"]
        AutoModelForCausalLM.from_pretrained(tmp_path / f"results/merged/smoke/{m}/{combo}")
    assert (tmp_path / "results/benchmarks/compute_stats/smoke" / f"{experts[0]}.tsv").is_file()
    regmean_card = json.loads((tmp_path / f"results/merged/smoke/regmean/{combo}/merge_card.json").read_text())
    assert [c["examples"] for c in regmean_card["stats"]["cards"]] == [10, 10]
    assert card["fit"]["seconds"] > 0 and len(card["fit"]["coefficients"]) == 2
