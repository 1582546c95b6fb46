"""Sparse Model Soups: magnitude masks, mask-keeping retraining, soups of copies sharing a
mask, the study's config checks, a real two-cycle run scored with lm-eval, and the jobs
the default config plans."""

import json
import math

import pytest
import torch
import yaml

from mergescale.report.aggregate import describe_model, tidy_scores
from mergescale.config import ConfigError
from mergescale.evaluate.harness import EvalRequest, evaluate
from mergescale.models.llama import TinyShape, load_model, new_llama, save_model
from mergescale.studies.sparse_soups.cycle import (
    MaskKeeper,
    apply_masks,
    copy_scorer,
    magnitude_masks,
    prunable_tensors,
    run_cycle,
    sparsity_of,
    uniform_soup,
)
from mergescale.studies.sparse_soups.report import sparse_soups_table, table_markdown
from mergescale.studies.sparse_soups.plan import sparse_soups_plan
from mergescale.training.stages import finetune, pretrain_base
from mergescale.tasks import ALPHABET, make_splits, read_jsonl, write_jsonl
from mergescale.tasks.lmeval_yaml import write_task_yaml
from mergescale.models.tokenizer import build_char_tokenizer
from mergescale.training.loop import TrainConfig, train
from workflow_helpers import REPO, planned_jobs

SHAPE = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
QUIET = lambda m: None  # noqa: E731


def tiny_llama():
    tokenizer = build_char_tokenizer(ALPHABET)
    return new_llama(TinyShape(**SHAPE), tokenizer, seed=0), tokenizer


# --- masks -------------------------------------------------------------------------

def test_prunable_tensors_are_the_linear_weight_matrices():
    model, _ = tiny_llama()
    names = prunable_tensors(model)
    projections = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert len(names) == SHAPE["num_hidden_layers"] * len(projections)
    assert {n.split(".")[-2] for n in names} == projections
    params = dict(model.named_parameters())
    assert all(params[n].ndim == 2 for n in names)
    # embeddings, the output head and norms stay dense
    assert not any("embed" in n or "lm_head" in n or "norm" in n for n in names)


def test_known_answer_mask():
    w = {"a": torch.tensor([[3.0, -1.0], [0.5, 2.0]]), "b": torch.tensor([-4.0, 0.1])}
    glob = magnitude_masks(w, 0.5, "global")  # 3 of 6 pruned: 0.1, 0.5, -1
    assert glob["a"].tolist() == [[True, False], [False, True]] and glob["b"].tolist() == [True, False]
    layer = magnitude_masks(w, 0.5, "layer")  # 2 of 4 in a, 1 of 2 in b
    assert layer["a"].tolist() == [[True, False], [False, True]] and layer["b"].tolist() == [True, False]


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.75, 0.9])
def test_mask_hits_the_target_exactly_even_with_ties(scope, sparsity):
    gen = torch.Generator().manual_seed(1)
    # integer-valued weights: thousands of ties around every threshold
    w = {"x": torch.randint(-3, 4, (37, 29), generator=gen).float(),
         "y": torch.randint(-3, 4, (101,), generator=gen).float()}
    masks = magnitude_masks(w, sparsity, scope)
    groups = [list(w)] if scope == "global" else [[n] for n in w]
    for names in groups:
        n = sum(w[k].numel() for k in names)
        pruned = sum(int((~masks[k]).sum()) for k in names)
        assert pruned == math.floor(sparsity * n + 0.5)
        kept_min = torch.cat([w[k][masks[k]].abs() for k in names]).min()
        pruned_max = torch.cat([w[k][~masks[k]].abs() for k in names]).max()
        assert pruned_max <= kept_min  # the smallest magnitudes go


def test_zeros_of_an_earlier_cycle_stay_pruned():
    gen = torch.Generator().manual_seed(2)
    w = {"x": torch.randn(20, 30, generator=gen)}
    first = magnitude_masks(w, 0.5)
    apply_masks(w, first)
    second = magnitude_masks(w, 0.75)
    assert not (second["x"] & ~first["x"]).any()  # nested masks
    assert sparsity_of(w, ["x"]) == 0.5


def test_bad_weights_are_named():
    with pytest.raises(ValueError, match="tensor 'w': NaN"):
        magnitude_masks({"w": torch.tensor([1.0, float("nan")])}, 0.5)
    with pytest.raises(ValueError, match="scope 'row'"):
        magnitude_masks({"w": torch.ones(2)}, 0.5, "row")
    model, _ = tiny_llama()
    with pytest.raises(ValueError, match="tensor 'nope'"):
        MaskKeeper(model, {"nope": torch.ones(2, dtype=torch.bool)})


# --- retraining and soups ----------------------------------------------------------

def test_training_keeps_pruned_weights_at_exactly_zero():
    torch.set_num_threads(1)
    model, tokenizer = tiny_llama()
    names = prunable_tensors(model)
    params = dict(model.named_parameters())
    masks = magnitude_masks({n: params[n] for n in names}, 0.6)
    apply_masks(params, masks)
    before = {n: params[n].detach().clone() for n in names}
    keeper = MaskKeeper(model, masks)
    rows = make_splits("first_letter", {"train": 100, "validation": 1, "test": 1})["train"]
    train(model, tokenizer, {"first_letter": rows}, TrainConfig(steps=8, batch_size=16, lr=1e-2, warmup_steps=1),
          log=QUIET, after_backward=keeper.mask_grads, after_step=keeper.apply)
    for n in names:
        assert torch.equal(params[n][~masks[n]], torch.zeros(int((~masks[n]).sum())))
        assert not torch.equal(params[n][masks[n]], before[n][masks[n]])  # the rest trained
    assert sparsity_of(params, names) == pytest.approx(0.6, abs=1 / sum(params[n].numel() for n in names))


def test_soup_of_copies_sharing_a_mask_has_the_same_zeros():
    gen = torch.Generator().manual_seed(3)
    mask = torch.rand(16, 8, generator=gen) > 0.7
    copies = [{"w": torch.randn(16, 8, generator=gen) * mask, "norm": torch.randn(8, generator=gen)}
              for _ in range(3)]
    soup = uniform_soup(copies)
    assert torch.equal(soup["w"] == 0, ~mask)
    assert torch.allclose(soup["w"], (copies[0]["w"] + copies[1]["w"] + copies[2]["w"]) / 3)
    assert torch.allclose(soup["norm"], torch.stack([c["norm"] for c in copies]).mean(0))


def test_soup_of_one_copy_is_that_copy():
    gen = torch.Generator().manual_seed(4)
    state = {"w": torch.randn(5, 7, generator=gen), "b": torch.randn(3, generator=gen)}
    soup = uniform_soup([state])
    assert all(torch.equal(soup[n], state[n]) for n in state)
    with pytest.raises(ValueError, match="tensor 'b'"):
        uniform_soup([state, {"w": state["w"]}])


# --- a real run: two cycles from a fine-tuned expert, scored with lm-eval -------------

@pytest.fixture(scope="module")
def two_cycles(tmp_path_factory):
    root = tmp_path_factory.mktemp("sparse_soups")
    torch.set_num_threads(1)
    task = "first_letter"
    for split, rows in make_splits(task, {"train": 400, "validation": 40, "test": 40}).items():
        write_jsonl(rows, root / "data" / f"{split}.jsonl")
    write_task_yaml(task, "test", root / "data" / "test.jsonl", root / "tasks" / f"{task}_test.yaml")
    train_file = {task: root / "data" / "train.jsonl"}
    pretrain_base(SHAPE, {"steps": 30, "batch_size": 32}, train_file, root / "base", log=QUIET)
    finetune(root / "base", {"steps": 200, "batch_size": 32, "lr": 5e-3}, train_file, root / "expert",
             stage="finetune_expert", log=QUIET)
    train_rows, val_rows = read_jsonl(root / "data" / "train.jsonl"), read_jsonl(root / "data" / "validation.jsonl")
    settings = [{"steps": 15, "batch_size": 32, "lr": 2e-3, "warmup_steps": 2, "seed": s} for s in (0, 1, 2)]
    cards, start = [], root / "expert"
    for cycle, sparsity in ((1, 0.5), (2, 0.75)):
        out = root / f"c{cycle}"
        cards.append(run_cycle(start, task, train_rows, val_rows, sparsity=sparsity, settings=settings,
                               soup_dir=out / "soup", best_dir=out / "best_copy", card_path=out / "card.json",
                               cycle=cycle, score_copies=copy_scorer(start, root / "tasks", task, log=QUIET),
                               log=QUIET))
        start = out / "soup"
    return root, cards


def test_cycles_write_sparse_soups_and_cards(two_cycles):
    root, cards = two_cycles
    for card, target in zip(cards, (0.5, 0.75)):
        out = root / f"c{card['cycle']}"
        assert json.loads((out / "card.json").read_text()) == json.loads(json.dumps(card))
        n = card["prunable_parameters"]
        assert card["sparsity"]["mask"] == math.floor(target * n + 0.5) / n
        soup, _ = load_model(out / "soup")
        best, _ = load_model(out / "best_copy")
        names = prunable_tensors(soup)
        assert names == card["prunable_tensors"]
        measured = sparsity_of(dict(soup.named_parameters()), names)
        assert measured == card["sparsity"]["soup"] >= card["sparsity"]["mask"]
        assert sparsity_of(dict(best.named_parameters()), names) >= card["sparsity"]["mask"]
        losses = [c["validation_loss"] for c in card["copies"]]
        assert card["best_copy"] == losses.index(min(losses))
        assert [c["seed"] for c in card["copies"]] == [0, 1, 2]
        assert all(0 <= c["test"]["first_letter"] <= 1 for c in card["copies"])
        saved = json.loads((out / "soup" / "training_card.json").read_text())
        assert saved["sparsity"] == card["sparsity"]["soup"] and saved["target_sparsity"] == target
    # cycle 2 pruned cycle 1's soup further, keeping its zeros
    c1, _ = load_model(root / "c1" / "soup")
    c2, _ = load_model(root / "c2" / "soup")
    p1, p2 = dict(c1.named_parameters()), dict(c2.named_parameters())
    assert all(bool((p2[n][p1[n] == 0] == 0).all()) for n in prunable_tensors(c1))
    assert cards[1]["start_sparsity"] == cards[0]["sparsity"]["soup"]


def test_a_nan_weight_names_checkpoint_and_tensor(two_cycles, tmp_path):
    root, _ = two_cycles
    model, tokenizer = load_model(root / "expert")
    name = prunable_tensors(model)[3]
    with torch.no_grad():
        dict(model.named_parameters())[name][0, 0] = float("nan")
    save_model(model, tokenizer, tmp_path / "bad")
    rows = read_jsonl(root / "data" / "validation.jsonl")
    with pytest.raises(ValueError, match=f"{tmp_path / 'bad'}: tensor '{name}': NaN"):
        run_cycle(tmp_path / "bad", "first_letter", rows, rows, sparsity=0.5, settings=[{"steps": 1}],
                  soup_dir=tmp_path / "s", best_dir=tmp_path / "b", card_path=tmp_path / "c.json", log=QUIET)
    assert not (tmp_path / "s").exists() and not (tmp_path / "c.json").exists()


def test_soup_loads_and_scores_with_lm_eval_as_in_the_job(two_cycles):
    root, cards = two_cycles
    req = lambda d: EvalRequest(model_dir=d, task_dir=root / "tasks", tasks=(("first_letter", "test"),))  # noqa: E731
    expert = evaluate(req(root / "expert"), log=QUIET)["scores"][0]["value"]
    assert expert > 0.2  # the dense expert learnt its task: the comparison means something
    soup = evaluate(req(root / "c1" / "soup"), log=QUIET)["scores"][0]
    assert soup["n"] == 40 and 0 <= soup["value"] <= 1
    # the best copy scored by evaluate() equals its in-job score
    best = cards[0]["best_copy"]
    got = evaluate(req(root / "c1" / "best_copy"), log=QUIET)["scores"][0]["value"]
    assert got == cards[0]["copies"][best]["test"]["first_letter"]
    # tables: scores.csv rows and the score-vs-sparsity table
    evals = root / "results" / "evals"
    files = []
    for model, path in (("experts/b/first_letter", root / "expert"),
                        ("sparse/b/first_letter/c1/soup", root / "c1" / "soup"),
                        ("sparse/b/first_letter/c1/best_copy", root / "c1" / "best_copy"),
                        ("sparse/b/first_letter/c2/soup", root / "c2" / "soup"),
                        ("sparse/b/first_letter/c2/best_copy", root / "c2" / "best_copy")):
        result = evaluate(req(path), log=QUIET)
        result["model_card"] = json.loads((path / "training_card.json").read_text())
        f = evals / model / "scores.json"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(result))
        files.append(str(f))
    scores = tidy_scores(files, ["first_letter"], [], {})
    sparse = scores[scores.kind == "sparse"]
    assert set(sparse.method) == {"sparse_soup", "sparse_best_copy"}
    assert set(sparse.expert_task) == {"first_letter"} and sparse.trained_on.all()
    assert sorted(sparse.sparsity.round(6).unique()) == sorted(
        {round(c["sparsity"]["soup"], 6) for c in cards} | {round(c["sparsity"]["best_copy"], 6) for c in cards})
    table = sparse_soups_table(scores, [("b", c) for c in cards])
    assert list(table.cycle) == [0, 1, 2] and table.sparsity.is_monotonic_increasing
    assert table["soup"].iloc[0] == expert
    row = table[table.cycle == 1].iloc[0]
    assert row["copies mean"] == pytest.approx(sum(c["test"]["first_letter"] for c in cards[0]["copies"]) / 3)
    assert "| b | first_letter | 2 | 0.750 |" in table_markdown(table)


def test_describe_sparse_model_path():
    row = describe_model("results/evals/sparse/tiny-s/first_letter/c2/best_copy/scores.json")
    assert row == {"kind": "sparse", "base": "tiny-s", "method": "sparse_best_copy", "combo": None,
                   "expert_task": "first_letter", "model": "sparse/tiny-s/first_letter/c2/best_copy"}


# --- config ------------------------------------------------------------------------

def default_config():
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def test_default_plan():
    plan = sparse_soups_plan(default_config())
    assert plan.cycles == [1, 2] and plan.copies == 3
    assert plan.start_dir("tiny-s", "larger_number", 1) == "results/experts/tiny-s/larger_number"
    assert plan.start_dir("tiny-s", "larger_number", 2) == "results/sparse/tiny-s/larger_number/c1/soup"
    seeds = [s["seed"] for c in plan.cycles for s in plan.copy_settings(c)]
    assert len(set(seeds)) == 6  # every retrained copy has its own data order
    assert plan.model_dirs() == [f"sparse/tiny-s/larger_number/c{c}/{m}" for c in (1, 2)
                                 for m in ("soup", "best_copy")]


@pytest.mark.parametrize("change, key", [
    ({"bases": ["nope"]}, "sparse_soups.bases"),
    ({"tasks": ["second_letter"]}, "sparse_soups.tasks"),
    ({"sparsities": [0.75, 0.5]}, r"sparse_soups.sparsities\[1\]"),
    ({"sparsities": [1.0]}, r"sparse_soups.sparsities\[0\]"),
    ({"sparsities": []}, "sparse_soups.sparsities"),
    ({"copies": 0}, "sparse_soups.copies"),
    ({"lrs": [1e-3, 2e-3]}, "sparse_soups.lrs"),
    ({"retrain": {"batch_size": 8}}, "sparse_soups.retrain.steps"),
    ({"retrain": {"steps": 5, "lora": {"r": 4}}}, "sparse_soups.retrain.lora"),
    ({"scope": "row"}, "sparse_soups.scope"),
    ({"examples": 0}, "sparse_soups.examples"),
])
def test_bad_config_names_the_key(change, key):
    config = default_config()
    config["sparse_soups"].update(change)
    with pytest.raises(ConfigError, match=f"config key {key}"):
        sparse_soups_plan(config)


def test_lrs_give_each_copy_its_learning_rate():
    config = default_config()
    config["sparse_soups"]["lrs"] = [1e-3, 2e-3, 4e-3]
    plan = sparse_soups_plan(config)
    assert [s["lr"] for s in plan.copy_settings(2)] == [1e-3, 2e-3, 4e-3]


def test_default_config_plans_the_cycles(tmp_path):
    jobs = planned_jobs(tmp_path, config=REPO / "config" / "config.yaml")
    config = default_config()
    config.pop("sparse_soups")
    without = tmp_path / "without.yaml"
    without.write_text(yaml.safe_dump(config))
    (tmp_path / "w").mkdir()
    base = planned_jobs(tmp_path / "w", config=without)
    assert jobs["run_sparse_soup_cycle"] == 2 and jobs["report_sparse_soups"] == 1
    # soup and best copy per cycle, scored in one batch (evaluate.batch) and split
    assert jobs["evaluate_batch"] - base["evaluate_batch"] == 1
    assert jobs["unbatch_scores"] - base["unbatch_scores"] == 4
    assert jobs["evaluate"] == base["evaluate"]
    added = sum(jobs.values()) - sum(base.values())
    assert added == 8
