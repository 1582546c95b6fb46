"""The study grid: base labels, instruct bases, tuning search spaces, and the planned DAG
of config/study.yaml (job counts computed here from the config, independently of the
workflow's own wiring)."""

import math
import time

import pytest
import yaml

from mergescale.config import ConfigError, check_semantics, load_config
from mergescale.sources.grid import base_labels, instruct_tasks, llama_parameter_count, pretrain_tasks, root_base
from mergescale.merge.errors import MergeInputError
from mergescale.models.llama import TinyShape, count_parameters, new_llama
from mergescale.tasks import ALPHABET, get_family
from mergescale.tasks.families import families_with_role
from mergescale.models.tokenizer import build_char_tokenizer, char_vocab_size
from mergescale.merge.search_space import candidates, search_space
from workflow_helpers import REPO, planned_jobs

STUDY = REPO / "config" / "study.yaml"
METHODS_GRID = REPO / "config" / "study-methods.yaml"


@pytest.mark.parametrize("shape", [(64, 2, 4, 256), (128, 4, 4, 256), (256, 4, 8, 1024)])
def test_parameter_count_without_building_matches_the_model(shape):
    shape = TinyShape(*shape)
    tokenizer = build_char_tokenizer(ALPHABET)
    model = new_llama(shape, tokenizer, seed=0)
    assert char_vocab_size(ALPHABET) == len(tokenizer)
    assert llama_parameter_count(vars(shape), len(tokenizer)) == count_parameters(model)


def test_study_spans_sizes_and_qualities():
    config = load_config(STUDY)
    labels = base_labels(config["bases"])
    params = sorted({v["parameters"] for v in labels.values()})
    assert len(params) >= 3 and params[-1] / params[0] >= 8
    for size in {v["size"] for v in labels.values()}:
        qualities = {v["quality"] for name, v in labels.items()
                     if v["size"] == size and config["bases"][name]["source"] != "variant"}
        assert qualities == {"short", "pretrained", "instruct"}
    assert labels["tiny-m-it"] == {**labels["tiny-m"], "quality": "instruct"}
    assert root_base(config["bases"], "tiny-l-it") == "tiny-l"
    # the paper's four methods only; every other method is in the other-methods grid
    assert set(config["merge"]["methods"]) == {"average", "task_arithmetic", "ties", "dare_ties"}
    assert set(config["merge"]["ks"]) == {2, 4, 6, 8} and config["merge"]["subsets_per_k"] >= 3


def test_other_methods_grid_is_size_s_from_three_seeds():
    study, config = load_config(STUDY), load_config(METHODS_GRID)
    labels = base_labels(config["bases"])
    assert {v["size"] for v in labels.values()} == {"s"}
    assert {v["replicate"] for v in labels.values()} == {0, 1, 2}
    # the LoRA variants: their seed's weights and size, their own quality label
    for name, seed in (("tiny-s-lora", "tiny-s"), ("tiny-s-r2-lora", "tiny-s-r2")):
        assert labels[name] == {**labels[seed], "quality": "lora"}
        assert root_base(config["bases"], name) == seed
    # the same world and size-s bases as the study, and more methods than its four
    for key in ("data", "tasks", "finetune"):
        assert config[key] == study[key], key
    for name in ("tiny-s", "tiny-s-r1", "tiny-s-r2"):
        assert config["bases"][name] == study["bases"][name], name
    assert set(study["merge"]["methods"]) < set(config["merge"]["methods"])


def test_pretraining_and_instruction_mixtures_exclude_every_benchmark_family():
    benchmark = set(families_with_role("task"))
    for mixture in (pretrain_tasks(), instruct_tasks()):
        assert mixture and not set(mixture) & benchmark
    assert not set(pretrain_tasks()) & set(instruct_tasks())
    for config in (load_config(STUDY), load_config(REPO / "config" / "config.yaml")):
        assert set(config["tasks"]["held_in"] + config["tasks"]["held_out"]) <= benchmark


@pytest.mark.parametrize("k", [2, 4, 8])
def test_tuning_grids_reach_plain_averaging(k):
    """Task arithmetic with lambda = 1/k is the experts' average: every grid contains it."""
    assert search_space("task_arithmetic", True, k=k)["lambda"][0] == round(1 / k, 4)
    assert 1 / 2 in search_space("task_arithmetic", True, k=2)["lambda"]
    assert len(search_space("task_arithmetic", True, k=2)["lambda"]) == 4  # 1/2 listed once
    assert search_space("ties", {"lambda": ["1/k", 1.0]}, k=k) == {"lambda": [round(1 / k, 4), 1.0]}


def test_study_tunes_the_paper_methods_on_equal_budgets():
    config = load_config(STUDY)
    methods = config["merge"]["methods"]
    budgets = {}
    for name in ("task_arithmetic", "ties", "dare_ties"):
        spec = methods[name]
        for k in config["merge"]["ks"]:
            space = search_space(spec["method"], spec["tune"], spec.get("params"), k=k)
            assert round(1 / k, 4) in space["lambda"], (name, k)
        budgets[name] = len(candidates(search_space(spec["method"], spec["tune"], spec.get("params"), k=3)))
    assert len(set(budgets.values())) == 1, budgets


def _with_base(spec):
    config = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())
    config["bases"]["it"] = spec
    return config


@pytest.mark.parametrize("spec, key", [
    ({"source": "instruct", "train": {"steps": 5}}, "bases.it.from"),
    ({"source": "instruct", "from": "nope", "train": {"steps": 5}}, "bases.it.from"),
    ({"source": "instruct", "from": "smoke"}, "bases.it.train"),
    ({"source": "instruct", "from": "smoke", "train": {"steps": 5},
      "shape": {"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1,
                "intermediate_size": 8}}, "bases.it.shape"),
    ({"source": "instruct", "from": "it", "train": {"steps": 5}}, "bases.it.from"),
])
def test_bad_instruct_base_names_the_key(spec, key):
    with pytest.raises(ConfigError, match=f"config key {key}"):
        check_semantics(_with_base(spec))


def test_replay_needs_the_pretraining_mixture_and_is_a_share():
    from mergescale.config import check_schema
    from mergescale.sources.grid import uses_replay

    assert uses_replay(load_config(REPO / "config" / "config.yaml"))
    assert uses_replay(load_config(STUDY))
    smoke = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())
    assert not uses_replay(smoke)
    smoke["finetune"]["expert"]["replay"] = 1.0  # a whole batch of replay trains no expert
    with pytest.raises(ConfigError, match="replay"):
        check_schema(smoke)


def test_search_space_from_registry_and_config():
    # the registered lambda grid, with 1/k first (k = 2 stands in when k is not given)
    assert search_space("task_arithmetic", True) == {"lambda": [0.5, 0.3, 0.7, 1.0]}
    assert search_space("task_arithmetic", True, k=4) == {"lambda": [0.25, 0.3, 0.5, 0.7, 1.0]}
    ties = search_space("ties", True)
    assert set(ties) == {"density", "lambda"}
    assert len(candidates(ties)) == len(ties["density"]) * len(ties["lambda"])
    # a hyperparameter fixed in params is not searched
    assert set(search_space("ties", True, {"lambda": 1.0})) == {"density"}
    assert search_space("ties", {"density": [0.3]}) == {"density": [0.3]}
    with pytest.raises(MergeInputError, match="tune.density"):
        search_space("ties", {"density": [1.5]})
    with pytest.raises(MergeInputError, match="no registered grid"):
        search_space("linear", True)


def test_tune_on_a_method_without_grid_is_a_config_error():
    config = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())
    config["merge"]["methods"]["average"]["tune"] = True
    with pytest.raises(ConfigError, match="config key merge.methods.average"):
        check_semantics(config)


RULE_OF_METHOD_RULE = {"twin_merging": "merge_rule_method", "opcm": "merge_opcm", "map": "merge_map",
                       "lora_lego": "merge_rule_method", "atlas": "merge_rule_method",
                       "task_arithmetic_tuned": "merge_rule_method"}
FIGURE_RULES = {"opcm": "plot_continual", "map": "report_map"}


def expected_study_jobs(config: dict) -> dict[str, int]:
    from mergescale.merge import get_method

    held_in, held_out = config["tasks"]["held_in"], config["tasks"]["held_out"]
    bases = config["bases"]
    n_bases = len(bases)
    n_source = {src: sum(spec["source"] == src for spec in bases.values())
                for src in ("pretrain", "instruct", "variant")}
    subsets = {k: min(config["merge"]["subsets_per_k"], math.comb(len(held_in), k)) for k in config["merge"]["ks"]}

    def n_combos(base, spec=None):
        """Subsets merged on `base` (by the method `spec`): base and method `ks`, method `bases`."""
        if spec is not None and base not in spec.get("bases", bases):
            return 0
        ks = set(bases[base].get("ks", subsets)) & set((spec or {}).get("ks", subsets))
        return sum(subsets[k] for k in ks)

    methods = config["merge"]["methods"]
    engine = {n: s for n, s in methods.items() if "method" in s}
    data_tasks = set(held_in) | set(held_out) | set(families_with_role("pretrain"))
    if n_source["instruct"]:
        data_tasks |= set(families_with_role("instruct"))
    multitask_per_subset = int(config["finetune"]["multitask"].get("per_subset", False))
    splits = set(config["evaluate"]["splits"])
    yamls = len(held_in + held_out) * len(splits)
    if "validation" not in splits:
        yamls += len(held_in)  # validation YAMLs of the tasks tuning and MAP probes touch
    ensemble = config["evaluate"].get("ensemble", True)
    def runs(base, spec, k):
        """Whether `spec` merges subsets of size k on `base`."""
        return (base in spec.get("bases", bases) and k in bases[base].get("ks", subsets)
                and k in spec.get("ks", subsets))

    # evaluate.batch: a base and its experts form one batch, and so do a subset's
    # multitask model and engine merges (when there are two models or more);
    # rule-methods and ensembles are scored alone.
    batches = unbatched = alone = 0
    for b in bases:
        batches += 1
        unbatched += 1 + len(held_in) + (1 - multitask_per_subset)  # the all-held-in multitask model
        for k in bases[b].get("ks", subsets):
            members = multitask_per_subset + sum(runs(b, s, k) for s in engine.values())
            if members > 1:
                batches += subsets[k]
                unbatched += subsets[k] * members
            else:
                alone += subsets[k] * members
    jobs = {
        "make_task_data": len(data_tasks), "render_task": yamls,
        "pretrain_base": n_source["pretrain"], "instruct_base": n_source["instruct"],
        "finetune_expert": n_bases * len(held_in),
        "finetune_multitask": n_bases * (1 - multitask_per_subset) + multitask_per_subset * sum(
            n_combos(b) for b in bases),
        "merge": sum(n_combos(b, s) for b in bases for s in engine.values()),
        "tune": sum(n_combos(b, s) for b in bases for s in engine.values() if s.get("tune")),
        "compute_stats": len(held_in) * sum(
            any(get_method(s["method"]).needs_stats_rule and n_combos(b, s) for s in engine.values())
            for b in bases),
        "build_ensemble": sum(n_combos(b) for b in bases) * int(ensemble),
        "evaluate": alone + sum(n_combos(b) * int(ensemble)
                                + sum(n_combos(b, s) for s in methods.values() if "rule" in s) for b in bases),
        "evaluate_batch": batches,
        "unbatch_scores": unbatched,
        "aggregate_scores": 1, "write_findings": 1, "plot_figures": 1, "all": 1,
        "compute_task_vector_stats": n_bases, "write_task_vector_table": 1,
        "write_tuning_table": int(any(s.get("tune") for s in engine.values())),
    }
    if n_source["variant"]:
        jobs["link_variant_base"] = n_source["variant"]
    for spec in methods.values():
        if "rule" in spec:
            rule = RULE_OF_METHOD_RULE[spec["rule"]]
            jobs[rule] = jobs.get(rule, 0) + sum(n_combos(b, spec) for b in bases)
            if spec["rule"] in FIGURE_RULES:
                jobs[FIGURE_RULES[spec["rule"]]] = 1
    sparse = config.get("sparse_soups")
    if sparse:  # one job per (base, task, cycle); soup and best copy, batched per (base, task)
        pairs = len(sparse.get("bases", list(bases)[:1])) * len(sparse.get("tasks", held_in[:1]))
        cycles = pairs * len(sparse["sparsities"])
        jobs["run_sparse_soup_cycle"] = cycles
        jobs["evaluate_batch"] += pairs
        jobs["unbatch_scores"] += 2 * cycles
        jobs["report_sparse_soups"] = 1
    return jobs


def test_study_dry_run_plans_the_whole_grid(tmp_path):
    config = load_config(STUDY)
    start = time.perf_counter()
    jobs = planned_jobs(tmp_path, config=STUDY)
    seconds = time.perf_counter() - start
    expected = {rule: n for rule, n in expected_study_jobs(config).items() if n}
    print(f"config/study.yaml: {sum(jobs.values())} jobs planned in {seconds:.1f}s: {jobs}")
    assert jobs == expected
    assert seconds < 300  # ~4,000 jobs (3 replicates per cell); DAG building must stay cheap


def test_other_methods_grid_dry_run_plans_every_method(tmp_path):
    config = load_config(METHODS_GRID)
    jobs = planned_jobs(tmp_path, config=METHODS_GRID)
    expected = {rule: n for rule, n in expected_study_jobs(config).items() if n}
    # aTLAS's merges (3 bases x 2 methods x 3 subsets at k = 2) join their subset's batch
    expected["unbatch_scores"] += 3 * 2 * 3
    expected["evaluate"] -= 3 * 2 * 3
    print(f"config/study-methods.yaml: {sum(jobs.values())} jobs planned: {jobs}")
    assert {r: n for r, n in jobs.items() if r in expected} == expected
    # and the study of its own: Sparse Model Soups on every seed
    assert jobs["run_sparse_soup_cycle"] == 3 * 2


def test_unbatched_evaluation_plans_one_job_per_model(tmp_path):
    """evaluate.batch: false gives every model its own evaluate job (the batched plan
    is checked against the study above)."""
    config = load_config(REPO / "config" / "smoke.yaml")
    config["evaluate"]["batch"] = False
    path = tmp_path / "unbatched.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    jobs = planned_jobs(tmp_path / "work", config=path)
    held_in, n_combos = config["tasks"]["held_in"], len(config["merge"]["ks"])  # one subset per k
    # base, experts; per subset: the multitask model (per_subset), merges and ensemble
    assert config["finetune"]["multitask"]["per_subset"]
    models = 1 + len(held_in) + n_combos * (1 + len(config["merge"]["methods"]) + 1)
    assert jobs["evaluate"] == models
    assert "evaluate_batch" not in jobs and "unbatch_scores" not in jobs


def test_instruct_base_trains_through_the_workflow(tmp_path):
    """An instruct base is built by the real rule (its script is shared with the
    fine-tuning rules and reads every param they pass): the smoke base further trained
    on the instruction-tuning families; neither card lists a held-in or held-out family."""
    import json

    from workflow_helpers import SMOKE_CONFIG, snakemake

    config = yaml.safe_load(SMOKE_CONFIG.read_text())
    config["bases"]["smoke-it"] = {"source": "instruct", "from": "smoke",
                                   "train": {"steps": 10, "batch_size": 16, "lr": 1.0e-3, "replay": 0.25}}
    config["bases"]["smoke"]["pretrain"]["steps"] = 10
    config["finetune"]["expert"].update(steps=5, replay=0.5)
    task = config["tasks"]["held_in"][0]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    snakemake(tmp_path, "--cores", "1", "results/bases/smoke-it", f"results/experts/smoke/{task}", config=path)
    card = json.loads((tmp_path / "results/bases/smoke-it/training_card.json").read_text())
    assert card["stage"] == "instruct_base" and card["config"]["steps"] == 10
    assert card["tasks"] == instruct_tasks()
    benchmark = config["tasks"]["held_in"] + config["tasks"]["held_out"]
    assert not set(card["tasks"]) & set(benchmark)
    # replay: a share of each batch from the pretraining mixture, never a benchmark family
    expert = json.loads((tmp_path / f"results/experts/smoke/{task}/training_card.json").read_text())
    assert expert["tasks"] == [task] and expert["config"]["replay"] == 0.5
    for c in (card, expert):
        assert c["replay_tasks"] == pretrain_tasks() and not set(c["replay_tasks"]) & set(benchmark)
    base_card = json.loads((tmp_path / "results/bases/smoke/training_card.json").read_text())
    assert base_card["tasks"] == pretrain_tasks() and not set(base_card["tasks"]) & set(benchmark)


def test_subsets_nest_across_k_and_are_distinct():
    from mergescale.tasks.combos import expert_subsets, parse_combo

    held_in = [f"t{i}" for i in range(8)]
    combos = expert_subsets(held_in, [2, 4, 6, 8], 3, seed=0)
    by_k = {}
    for name, tasks in combos.items():
        k, s = parse_combo(name)
        assert len(tasks) == k
        by_k.setdefault(k, {})[s] = set(tasks)
    assert {k: len(v) for k, v in by_k.items()} == {2: 3, 4: 3, 6: 3, 8: 1}
    for k, small in ((2, 4), (4, 6)):
        for s in range(3):
            assert by_k[k][s] < by_k[small][s]  # each k's subsets extend the smaller k's
    for k in (2, 4, 6):
        assert len({frozenset(t) for t in by_k[k].values()}) == 3
    # another k list does not change the subsets that remain
    assert expert_subsets(held_in, [2, 4], 3, seed=0) == {
        n: t for n, t in combos.items() if parse_combo(n)[0] in (2, 4)}


def test_study_replicates_every_size_and_quality():
    config = load_config(STUDY)
    labels = base_labels(config["bases"])
    cells = {}
    for name, v in labels.items():
        if config["bases"][name]["source"] != "variant":  # same weights, other fine-tuning
            cells.setdefault((v["size"], v["quality"]), set()).add(v["replicate"])
    for cell, replicates in cells.items():
        assert len(replicates) >= 3, cell
