"""LoRA-LEGO: known answers and properties computed here, independently of
src/mergescale/rule_methods/lora_lego.py, on real peft adapters of a tiny character-level Llama; bad
inputs; and an end-to-end merge of two LoRA experts fine-tuned by the workflow's stage."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merge_fixtures import load_state
from mergescale.training.lora import ADAPTER_DIR, LoraSpec, add_lora, fold_lora
from mergescale.rule_methods.lora_lego import Adapter, lora_lego, merge_lora_lego, read_adapter
from mergescale.merge.errors import MergeInputError
from mergescale.models.llama import TinyShape, load_model, new_llama, save_model
from mergescale.rule_methods.registry import resolve_params
from mergescale.tasks import ALPHABET
from mergescale.models.tokenizer import build_char_tokenizer

SHAPE = TinyShape(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def _lora_expert(base_dir: Path, out: Path, seed: int, r: int = 4, alpha: float = 8.0,
                 permutation: list[int] | None = None) -> Path:
    """A real peft adapter (A from peft's seeded init, B random instead of zero), saved in
    out/adapter/ and folded into out/'s weights, as stages.finetune writes a LoRA expert.
    `permutation` reorders the adapter's rank-one units (rows of A, columns of B)."""
    model, tok = load_model(base_dir)
    peft_model = add_lora(model, LoraSpec(r=r, alpha=alpha), seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
        if permutation is not None:
            for name, p in peft_model.named_parameters():
                if "lora_A" in name:
                    p.copy_(p[permutation])
                elif "lora_B" in name:
                    p.copy_(p[:, permutation])
    save_model(fold_lora(peft_model, out / ADAPTER_DIR), tok, out)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("lego")
    tok = build_char_tokenizer(ALPHABET)
    base = root / "base"
    save_model(new_llama(SHAPE, tok, seed=0), tok, base)
    e1 = _lora_expert(base, root / "e1", seed=1)
    experts = {
        "e1": e1,
        "e2": _lora_expert(base, root / "e2", seed=2),
        "e2_permuted": _lora_expert(base, root / "e2p", seed=2, permutation=[2, 0, 3, 1]),
        "e1_permuted": _lora_expert(base, root / "e1p", seed=1, permutation=[3, 2, 1, 0]),
    }
    for i in (2, 3):  # byte-identical copies of e1
        experts[f"e1_copy{i}"] = Path(shutil.copytree(e1, root / f"e1_copy{i}"))
    return root, base, experts


def _merged_state(models, names, name, **params):
    root, base, experts = models
    out = root / name
    card = merge_lora_lego(base, [experts[n] for n in names], out, params, log=lambda _: None)
    return load_state(out), card, out


@pytest.mark.parametrize("n", [2, 3])
def test_identical_adapters_give_that_adapters_update(models, n):
    names = ["e1", "e1_copy2", "e1_copy3"][:n]
    merged, card, out = _merged_state(models, names, f"identical{n}")
    expert = load_state(models[2]["e1"])  # the base with e1's adapter folded in by peft
    assert set(merged) == set(expert)
    for name, t in expert.items():
        torch.testing.assert_close(merged[name], t, rtol=1e-5, atol=1e-6, msg=name)
    assert card["units_per_module"] == 4 * n
    assert all(sorted(sizes) == [n] * 4 for sizes in card["cluster_sizes"].values())
    # the merged adapter written next to the checkpoint is e1's adapter (its units, in some order)
    ours, theirs = read_adapter(out), read_adapter(models[2]["e1"])
    assert ours.r == 4
    for name in theirs.lora_a:
        torch.testing.assert_close(ours.delta(name), theirs.delta(name), rtol=1e-5, atol=1e-6)


def test_one_adapter_at_its_own_rank_is_the_identity(models):
    adapter = read_adapter(models[2]["e2"])
    result = lora_lego([adapter])
    for name in adapter.lora_a:
        # every unit is a cluster of its own: the same units, possibly reordered
        rows = {tuple(r.tolist()) for r in adapter.lora_a[name]}
        assert {tuple(r.tolist()) for r in result.lora_a[name]} == rows
        torch.testing.assert_close(result.delta(name), adapter.delta(name), rtol=1e-6, atol=1e-7)


def test_permuting_an_adapters_units_changes_nothing(models):
    ref, _, _ = _merged_state(models, ["e1", "e2"], "pair")
    for names in (["e1", "e2_permuted"], ["e1_permuted", "e2"], ["e2", "e1"]):
        other, _, _ = _merged_state(models, names, "pair_" + "_".join(names))
        for name, t in ref.items():
            torch.testing.assert_close(other[name], t, rtol=1e-5, atol=1e-6, msg=f"{names}: {name}")


def _adapter(a: torch.Tensor, b: torch.Tensor, path: str, scale: float = 2.0) -> Adapter:
    return Adapter(Path(path), a.shape[0], scale, {"m.weight": a}, {"m.weight": b})


def _rescaled_mean(rows: torch.Tensor) -> torch.Tensor:
    mean = rows.mean(0)
    return mean * rows.norm(dim=1).mean() / mean.norm()


def test_known_answer_pairs_near_copies_and_rescales():
    # Adapter 2's units are adapter 1's, permuted and slightly perturbed: k-means at rank 3
    # pairs each unit with its copy; each merged unit is the pair's mean with its A and B
    # parts rescaled to the pair's mean norms.
    g = torch.Generator().manual_seed(0)
    a1, b1 = 3 * torch.randn(3, 5, generator=g), 3 * torch.randn(6, 3, generator=g)
    perm = [1, 2, 0]
    a2 = a1[perm] + 0.1 * torch.randn(3, 5, generator=g)
    b2 = b1[:, perm] + 0.1 * torch.randn(6, 3, generator=g)
    result = lora_lego([_adapter(a1, b1, "x"), _adapter(a2, b2, "y")])
    expected = torch.zeros(6, 5)
    for i in range(3):
        j = perm.index(i)  # adapter 2's copy of unit i
        a = _rescaled_mean(torch.stack([a1[i], a2[j]]))
        b = _rescaled_mean(torch.stack([b1[:, i], b2[:, j]]))
        expected += torch.outer(b, a)
    torch.testing.assert_close(result.delta("m.weight"), 2.0 * expected, rtol=1e-5, atol=1e-5)
    assert sorted(result.cluster_sizes["m.weight"]) == [2, 2, 2]


def test_rank_of_all_units_keeps_each_unit_and_reweights_the_output():
    # At rank n * r every unit is its own cluster; the output reweighting sqrt(r / k)
    # scales the sum of both adapters' updates.
    g = torch.Generator().manual_seed(1)
    ad1 = _adapter(torch.randn(2, 4, generator=g), torch.randn(5, 2, generator=g), "x")
    ad2 = _adapter(torch.randn(2, 4, generator=g) + 5, torch.randn(5, 2, generator=g), "y")
    result = lora_lego([ad1, ad2], rank=4)
    expected = math.sqrt(2 / 4) * (ad1.delta("m.weight") + ad2.delta("m.weight"))
    torch.testing.assert_close(result.delta("m.weight"), expected, rtol=1e-5, atol=1e-5)
    assert result.cluster_sizes["m.weight"] == [1, 1, 1, 1]


def test_rank_one_of_one_adapter_is_its_rescaled_mean_unit():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(3, 4, generator=g), torch.randn(5, 3, generator=g)
    result = lora_lego([_adapter(a, b, "x")], rank=1)
    expected = math.sqrt(3 / 1) * 2.0 * torch.outer(_rescaled_mean(b.T), _rescaled_mean(a))
    torch.testing.assert_close(result.delta("m.weight"), expected, rtol=1e-5, atol=1e-5)


def test_expert_without_adapter_is_named(models, tmp_path):
    root, base, experts = models
    full = tmp_path / "full_expert"
    shutil.copytree(experts["e1"], full)
    shutil.rmtree(full / ADAPTER_DIR)
    with pytest.raises(MergeInputError, match=f"{full}: no LoRA adapter"):
        merge_lora_lego(base, [experts["e1"], full], tmp_path / "out", {}, log=lambda _: None)
    assert not (tmp_path / "out").exists()


def test_adapters_of_different_rank_or_alpha_are_named(models, tmp_path):
    root, base, experts = models
    r2 = _lora_expert(base, tmp_path / "r2", seed=3, r=2, alpha=4.0)  # same scale, other r
    with pytest.raises(MergeInputError, match=f"{r2} vs {experts['e1']}: adapters of rank 2 and 4"):
        merge_lora_lego(base, [experts["e1"], r2], tmp_path / "out", {}, log=lambda _: None)
    alpha = _lora_expert(base, tmp_path / "alpha", seed=3, r=4, alpha=16.0)
    with pytest.raises(MergeInputError, match=f"{alpha} vs {experts['e1']}: adapters with scale"):
        merge_lora_lego(base, [experts["e1"], alpha], tmp_path / "out", {}, log=lambda _: None)
    with pytest.raises(MergeInputError, match="rank 9 exceeds the 8 units"):
        merge_lora_lego(base, [experts["e1"], experts["e2"]], tmp_path / "out", {"rank": 9}, log=lambda _: None)


def test_corrupt_adapter_config_is_named(models, tmp_path):
    root, base, experts = models
    bad = Path(shutil.copytree(experts["e1"], tmp_path / "bad"))
    config = json.loads((bad / ADAPTER_DIR / "adapter_config.json").read_text())
    del config["r"]
    (bad / ADAPTER_DIR / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(MergeInputError, match="adapter_config.json: no 'r'"):
        read_adapter(bad)


def test_params_are_checked_with_the_key():
    assert resolve_params("lora_lego", None) == {"rank": 0, "iters": 50}
    with pytest.raises(ValueError, match=r"params.rnak is not a hyperparameter of rule-method lora_lego \(did you mean rank\?\)"):
        resolve_params("lora_lego", {"rnak": 2}, where="params.")
    with pytest.raises(MergeInputError, match="rank"):
        resolve_params("lora_lego", {"rank": -1}, where="params.")


def test_two_fine_tuned_lora_experts_merge_and_evaluate(tmp_path, monkeypatch):
    """End to end: a tiny pretrained base, two LoRA experts of stages.finetune (real
    training), LoRA-LEGO of their adapters, lm-eval on the merged checkpoint."""
    from mergescale.evaluate.harness import EvalRequest, evaluate
    from mergescale.training.stages import finetune, pretrain_base
    from mergescale.tasks import make_splits, write_jsonl, write_task_yaml

    monkeypatch.chdir(tmp_path)  # task YAMLs point at data relative to the working dir
    tasks = ["first_letter", "last_letter"]
    for task in tasks:
        splits = make_splits(task, {"train": 200, "validation": 10, "test": 30}, seed=0)
        for split in ("train", "test"):
            write_jsonl(splits[split], Path(f"data/{task}/{split}.jsonl"))
        write_task_yaml(task, "test", f"data/{task}/test.jsonl", Path(f"tasks/{task}_test.yaml"))
    train = {t: Path(f"data/{t}/train.jsonl") for t in tasks}
    quiet = lambda *_: None  # noqa: E731
    pretrain_base(vars(SHAPE), {"steps": 20, "batch_size": 16}, train, Path("base"), log=quiet)
    lora = {"steps": 20, "batch_size": 16, "lr": 1e-2, "lora": {"r": 4, "alpha": 8}}
    experts = [Path(f"experts/{t}") for t in tasks]
    for task, out in zip(tasks, experts):
        finetune(Path("base"), lora, {task: train[task]}, out, stage="finetune_expert", log=quiet)
    card = merge_lora_lego(Path("base"), experts, Path("merged"), {"rank": 4}, log=quiet)
    assert card["method"] == "lora_lego" and card["units_per_module"] == 8
    assert (Path("merged") / ADAPTER_DIR / "adapter_model.safetensors").is_file()
    merged, base = load_state(Path("merged")), load_state(Path("base"))
    changed = [n for n in merged if not torch.equal(merged[n], base[n])]
    assert changed and all(n.endswith("_proj.weight") for n in changed)  # only LoRA targets move
    saved = load_file(Path("merged") / ADAPTER_DIR / "adapter_model.safetensors")
    assert len(saved) == 2 * len(changed)
    out = evaluate(EvalRequest(model_dir=Path("merged"), task_dir=Path("tasks"),
                               tasks=tuple((t, "test") for t in tasks), batch_size=16, device="cpu"), log=quiet)
    assert [s["n"] for s in out["scores"]] == [30, 30]
    assert all(0.0 <= s["value"] <= 1.0 for s in out["scores"])


# -- config: variant bases, per-base fine-tuning, per-method bases --------------------


def _smoke_config():
    import yaml

    from workflow_helpers import SMOKE_CONFIG

    return yaml.safe_load(SMOKE_CONFIG.read_text())


def _with_lora_variant(config, **extra):
    base = next(iter(config["bases"]))
    config["bases"]["v"] = {"source": "variant", "from": base, "ks": [2],
                            "finetune": {"expert": {"lr": 1e-2, "lora": {"r": 2, "alpha": 4}}}, **extra}
    config["merge"]["methods"]["lego"] = {"rule": "lora_lego", "bases": ["v"]}
    return config, base


def test_variant_base_labels_finetune_settings_and_checks():
    from mergescale.config import check_schema, check_semantics
    from mergescale.sources.grid import base_labels, finetune_settings, root_base
    from mergescale.rule_methods.lora_lego import check_lora_bases

    config, base = _with_lora_variant(_smoke_config())
    check_schema(config)
    check_semantics(config)
    check_lora_bases(config, "lego")
    assert root_base(config["bases"], "v") == base
    labels = base_labels(config["bases"])
    assert labels["v"] == labels[base]  # same weights: same size, parameters and quality
    config["bases"]["v"]["quality"] = "lora"
    assert base_labels(config["bases"])["v"] == {**labels[base], "quality": "lora"}
    # shallow merge: the base's keys replace the global ones, the rest is kept
    glob = config["finetune"]["expert"]
    assert finetune_settings(config, "v", "expert") == {**glob, "lr": 1e-2, "lora": {"r": 2, "alpha": 4}}
    assert finetune_settings(config, base, "expert") == glob
    assert finetune_settings(config, "v", "multitask") == config["finetune"].get("multitask", {})


@pytest.mark.parametrize("edit, message", [
    (lambda c, b: c["bases"]["v"].pop("from"), "config key bases.v.from: required for source variant"),
    (lambda c, b: c["bases"]["v"].update({"from": "nope"}), "config key bases.v.from: no base named 'nope'"),
    (lambda c, b: c["bases"]["v"].update({"from": "v"}), "config key bases.v.from: bases v -> v form a cycle"),
    (lambda c, b: c["bases"]["v"].update({"train": {"steps": 3}}), "config key bases.v.train"),
    (lambda c, b: c["bases"]["v"].update({"ks": [5]}), r"config key bases.v.ks: \[5\] not in merge.ks"),
    (lambda c, b: c["bases"]["v"]["finetune"]["expert"].update({"steps_per_task": 3}),
     "config key bases.v.finetune.expert.steps_per_task"),
    (lambda c, b: c["bases"]["v"].update({"chat_template": True}), "config key bases.v.chat_template"),
    (lambda c, b: c["merge"]["methods"]["lego"].update({"bases": ["nope"]}),
     r"config key merge.methods.lego.bases: \['nope'\] are not bases of the grid"),
    (lambda c, b: c["merge"]["methods"]["lego"].update({"params": {"rank": 0.5}}),
     "config key merge.methods.lego: params.rank"),
])
def test_bad_variant_or_method_bases_name_the_key(edit, message):
    from mergescale.config import ConfigError, check_schema, check_semantics

    config, base = _with_lora_variant(_smoke_config())
    edit(config, base)
    with pytest.raises(ConfigError, match=message):
        check_schema(config)
        check_semantics(config)


def test_lora_lego_on_a_base_of_full_experts_is_a_config_error():
    from mergescale.config import ConfigError
    from mergescale.rule_methods.lora_lego import check_lora_bases

    config, base = _with_lora_variant(_smoke_config())
    config["merge"]["methods"]["lego"]["bases"] = [base, "v"]
    with pytest.raises(ConfigError, match=f"config key merge.methods.lego.bases: base {base} fine-tunes full"):
        check_lora_bases(config, "lego")


def test_dry_run_honours_variant_base_ks_and_method_bases(tmp_path):
    """The DAG of smoke.yaml (k in {2, 3}, one subset each) plus a LoRA variant merged at
    k=2 only, by the engine methods and LoRA-LEGO; LoRA-LEGO runs on the variant only."""
    import yaml

    from workflow_helpers import planned_jobs, planned_outputs

    config, base = _with_lora_variant(_smoke_config())
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    run = tmp_path / "run"
    jobs = planned_jobs(run, config=path)
    assert jobs["link_variant_base"] == 1 and jobs["merge_rule_method"] == 1
    assert jobs["finetune_expert"] == 2 * len(config["tasks"]["held_in"])
    assert jobs["finetune_multitask"] == 2 + 1  # the variant's only at k=2
    assert planned_outputs(run, "merge_rule_method", config=path) == ["results/merged/v/lego/k2s0"]
    engine = sorted(o for o in planned_outputs(run, "merge", config=path) if o.startswith("results/merged/v/"))
    assert engine == sorted(f"results/merged/v/{m}/k2s0" for m in ("average", "task_arithmetic", "ties",
                                                                      "dare_ties"))
