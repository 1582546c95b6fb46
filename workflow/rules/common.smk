# Config validation, wildcard constraints, target lists and input functions.
import importlib.util
import sys
from pathlib import Path

from snakemake.utils import validate

# The package lives in src/; a source checkout works without installing it.
sys.path.insert(0, str(Path(workflow.basedir).parent / "src"))

from mergescale.tasks.combos import ALL_HELD_IN, expert_subsets, parse_combo
from mergescale.config import check_schema, check_semantics
from mergescale.evaluate.harness import check_backend
from mergescale.sources.grid import (
    REPLAY_PREFIX,
    base_labels,
    finetune_settings,
    instruct_tasks,
    pretrain_tasks,
    uses_replay,
)
from mergescale.studies import study_plans
from mergescale.studies.cross_seed.plan import cross_seed_plan
from mergescale.studies.sparse_soups.plan import sparse_soups_plan
from mergescale.merge import get_method
from mergescale.rule_methods.registry import NEEDS, get_rule_method
from mergescale.resources import (
    WORK as RESOURCE_WORK,
    Work,
    check_gpu_placement,
    cpus_for,
    gpus_for,
    memory_mb,
    merge_work,
    rule_method_work as work_of_rule_method,
    model_size,
    runtime_min,
)
from mergescale.sources.declared import (
    bases_with_fetched_experts,
    fetched_bases,
    has_multitask,
    lm_eval_specs,
    lm_eval_split_tasks,
    model_ref,
    procedural_tasks,
)

check_schema(config)  # one line naming the key, before Snakemake's verbose report
validate(config, "../schemas/config.schema.yaml")  # (also fills in defaults)
check_semantics(config)


# Every rule's software (workflow/envs/mergescale.yaml), used under --software-deployment-method conda.
SOFTWARE = str(Path(workflow.basedir) / "envs" / "mergescale.yaml")


def package_source(module):
    """The source file of a package module, as a job input: editing it re-runs the job.
    Found without importing the module (no torch while the DAG is built)."""
    return importlib.util.find_spec(module).origin


def one_of(names):
    """A wildcard regex matching exactly these names (and nothing when there are none)."""
    return "|".join(map(re.escape, names)) or "(?!)"


HELD_IN = config["tasks"]["held_in"]
HELD_OUT = config["tasks"]["held_out"]
ALL_TASKS = HELD_IN + HELD_OUT
BASES = list(config["bases"])
PRETRAINED_BASES = [b for b in BASES if config["bases"][b]["source"] == "pretrain"]
INSTRUCT_BASES = [b for b in BASES if config["bases"][b]["source"] == "instruct"]
# Bases that reuse another base's weights with their own fine-tuning settings.
VARIANT_BASES = [b for b in BASES if config["bases"][b]["source"] == "variant"]
BASE_LABELS = base_labels(config["bases"])
QUALITIES = sorted({labels["quality"] for labels in BASE_LABELS.values()})
METHODS = config["merge"]["methods"]
# Rule-methods (`rule:` in the config; mergescale.rule_methods.registry).
RULE_METHODS = [name for name, spec in METHODS.items() if "rule" in spec]
COMBOS = expert_subsets(HELD_IN, config["merge"]["ks"], config["merge"]["subsets_per_k"], config["seed"])
# Studies beside the grid (mergescale.studies): the models, batches and final outputs
# they add. Their own rules read their plans: CROSS_SEED (rules/studies/cross_seed.smk),
# SPARSE_SOUPS (rules/studies/sparse_soups.smk).
STUDIES = study_plans(config, COMBOS)
CROSS_SEED = cross_seed_plan(config, COMBOS)
SPARSE_SOUPS = sparse_soups_plan(config)
GRID_BASES = [b for b in BASES if not any(b in study.own_bases() for study in STUDIES)]
EVAL_SPLITS = config["evaluate"]["splits"]
SPLITS = ["train", "validation", "test"]
# Data for the statistics of data-aware methods (and their fits): split and examples.
STATS = {"split": "validation", "examples": 64, **config["merge"].get("stats", {})}
# Model and task sources (hub/local models, public lm-eval tasks): see mergescale.sources.declared.
LM_EVAL_TASKS = lm_eval_specs(config)
PROCEDURAL_TASKS = procedural_tasks(config)
FETCHED_BASES = fetched_bases(config)
FETCHED_EXPERT_BASES = bases_with_fetched_experts(config)
# Pretraining and instruction tuning read families of their own (mergescale.tasks.families:
# roles), disjoint from the held-in and held-out ones; those need data too.
PRETRAIN_TASKS = pretrain_tasks() if PRETRAINED_BASES or uses_replay(config) else []
INSTRUCT_TASKS = instruct_tasks() if INSTRUCT_BASES else []
DATA_TASKS = PROCEDURAL_TASKS + [t for t in PRETRAIN_TASKS + INSTRUCT_TASKS if t not in PROCEDURAL_TASKS]

# Extra figures and tables that method rules add to `rule all`.
EXTRA_FINAL_OUTPUT = []


wildcard_constraints:
    base=one_of(BASES),
    task=one_of(ALL_TASKS + [t for t in DATA_TASKS if t not in ALL_TASKS]),
    split="|".join(SPLITS),
    method="[A-Za-z0-9][A-Za-z0-9_.-]*",
    combo=r"k\d+s\d+",


def model_dirs():
    """Every model the workflow evaluates, as a path below results/."""
    return [path for study in STUDIES for path in study.model_dirs()] + grid_model_dirs()


def grid_model_dirs():
    """The grid's models: bases, experts, multitask models, merges, ensembles."""
    out = []
    for base in GRID_BASES:
        out.append(f"bases/{base}")
        out += [f"experts/{base}/{task}" for task in HELD_IN]
        if has_multitask(config):
            out += [f"multitask/{base}/{t}" for t in multitask_tasksets(base)]
        out += [f"merged/{base}/{m}/{c}" for m in METHODS for c in method_combos(m, base)]
        if config["evaluate"].get("ensemble", True):
            out += [f"ensembles/{base}/{c}" for c in base_combos(base)]
    return out


def eval_batches():
    """{group: model dirs} scored together by one evaluate_batch job: a base with its
    experts, the checkpoints of one base and expert subset (its multitask model and the
    merges of engine methods and of rule-methods registered with batch_eval), and the
    batches of the studies (which may join those). Empty when evaluation cannot be batched (a backend other
    than hf, public lm-eval tasks, chat templates) or `evaluate.batch` is false; every
    other model gets a job of its own (rule evaluate)."""
    ev = config["evaluate"]
    if not ev.get("batch", True) or ev["backend"] != "hf" or any(t in LM_EVAL_TASKS for t in ALL_TASKS):
        return {}
    groups = {}
    for study in STUDIES:
        for group, paths in study.eval_batches().items():
            groups.setdefault(group, []).extend(p for p in paths if not uses_chat_template(p.split("/")[1]))
    for path in grid_model_dirs():
        kind, base, *rest = path.split("/")
        if uses_chat_template(base):
            continue
        if kind in ("bases", "experts"):
            groups.setdefault(f"experts/{base}", []).append(path)
        elif kind == "multitask" and rest[0] == ALL_HELD_IN:  # the one reference of a base
            groups.setdefault(f"experts/{base}", []).append(path)
        elif kind == "multitask":
            groups.setdefault(f"merged/{base}/{rest[0]}", []).append(path)
        elif kind == "merged" and batched_merge(rest[0]):
            groups.setdefault(f"merged/{base}/{rest[1]}", []).append(path)
    return {group: paths for group, paths in groups.items() if len(paths) > 1}


def base_combos(base):
    """Expert subsets of a base: every one, or those of the base's own `ks`."""
    ks = config["bases"][base].get("ks")
    return [c for c in COMBOS if ks is None or parse_combo(c)[0] in ks]


def method_combos(name, base=None):
    """Expert subsets merged with a method (on `base`): every one, or those of the
    method's (and the base's) own `ks`; none for a base outside the method's `bases`."""
    ks = METHODS[name].get("ks")
    if base is not None and base not in METHODS[name].get("bases", GRID_BASES):
        return []
    combos = COMBOS if base is None else base_combos(base)
    return [c for c in combos if ks is None or parse_combo(c)[0] in ks]


def get_final_output():
    return (
        [
            "results/tables/scores.csv",
            "results/tables/summary.md",
            "results/findings.md",
            *expand("results/plots/normalized_vs_k_{quality}.png", quality=QUALITIES),
            "results/plots/base_quality.png",
            "results/tables/task_vectors.md",
            *(["results/tables/tuning.md"] if tuning_records() else []),
        ]
        + [path for study in STUDIES for path in study.final_outputs()]
        + EXTRA_FINAL_OUTPUT
    )


def bases_with_source(source):
    return [b for b, spec in config["bases"].items() if spec["source"] == source]


def uses_chat_template(base):
    return config["bases"][base].get("chat_template", False)


def train_files(tasks):
    return {t: f"results/data/{t}/train.jsonl" for t in tasks}


def expert_train_config(base):
    return {"seed": config["seed"], **finetune_settings(config, base, "expert")}


def replay_files(train_cfg):
    """The pretraining mixture's training files, as inputs `replay__<task>`, for a run
    whose `replay` share of each batch comes from it (none without replay)."""
    if not train_cfg.get("replay"):
        return {}
    return {f"{REPLAY_PREFIX}{t}": f"results/data/{t}/train.jsonl" for t in PRETRAIN_TASKS}


# The multitask reference: one per base on every held-in task (ALL_HELD_IN, the paper's);
# with finetune.multitask.per_subset, one per expert subset (results/multitask/{base}/{combo}).
def multitask_per_subset():
    return (config.get("finetune") or {}).get("multitask", {}).get("per_subset", False)


def multitask_tasksets(base):
    return base_combos(base) if multitask_per_subset() else [ALL_HELD_IN]


def multitask_tasks(taskset):
    return HELD_IN if taskset == ALL_HELD_IN else COMBOS[taskset]


def multitask_train_config(base, taskset):
    """A multitask run sees the data its experts saw together: steps_per_task x tasks."""
    spec = finetune_settings(config, base, "multitask")
    spec.pop("per_subset", None)
    steps = spec.pop("steps_per_task") * len(multitask_tasks(taskset))
    return {"seed": config["seed"], **spec, "steps": steps}


def get_expert_dirs(wildcards):
    return [f"results/experts/{wildcards.base}/{t}" for t in COMBOS[wildcards.combo]]


def methods_of_rule(rule):
    """Config names of the entries `rule: <rule>` (a registered rule-method)."""
    return [m for m in RULE_METHODS if METHODS[m]["rule"] == rule]


def rule_method(name):
    """The registered rule-method of config entry `name` (mergescale.rule_methods.registry)."""
    return get_rule_method(METHODS[name]["rule"])


def engine_methods():
    """{method} wildcard of the merge rule: every method that is not a rule-method."""
    return one_of([m for m in METHODS if m not in RULE_METHODS])


def generic_rule_methods():
    """{method} wildcard of merge_rule_method: the rule-methods without a rule of their own."""
    return one_of([m for m in RULE_METHODS if not rule_method(m).own_rule])


def methods_using(rule_name):
    """{method} wildcard of a rule-method's own rule: the config names with `rule: <rule_name>`."""
    return one_of(methods_of_rule(rule_name))


def batched_merge(name):
    """Whether config entry `name`'s merges are scored in their subset's evaluate_batch job."""
    return name not in RULE_METHODS or rule_method(name).batch_eval


def get_rule_method_inputs(wildcards):
    """A rule-method job's inputs: base, experts, one file per task for each thing the
    method needs, and the method's source (editing it re-runs only its merges)."""
    method = rule_method(wildcards.method)
    tasks = COMBOS[wildcards.combo]
    inputs = {
        "base": f"results/bases/{wildcards.base}",
        "experts": [f"results/experts/{wildcards.base}/{t}" for t in tasks],
        "source": method.source_file,
    }
    for need in method.needs:
        if NEEDS[need] is not None:
            inputs[need] = [NEEDS[need].format(task=t) for t in tasks]
    return inputs


def rule_method_name(wildcards):
    return METHODS[wildcards.method]["rule"]


def subset_tasks(wildcards):
    return COMBOS[wildcards.combo]


EVALUATE_SETTINGS = {"batch_size": config["evaluate"]["batch_size"], "limit": config["evaluate"]["limit"]}


def method_params(wildcards):
    return METHODS[wildcards.method].get("params", {})


def get_method_source(wildcards):
    # The file that implements the method: editing it re-runs only its merges.
    return get_method(METHODS[wildcards.method]["method"]).source_file


def tuning_records():
    """Every tuning record the grid writes (tuned engine methods on grid bases)."""
    return [
        f"results/tuning/{base}/{m}/{c}.json"
        for base in GRID_BASES
        for m in METHODS
        if "method" in METHODS[m] and METHODS[m].get("tune")
        for c in method_combos(m, base)
    ]


def get_tuning_record(wildcards):
    if METHODS[wildcards.method].get("tune"):
        return f"results/tuning/{wildcards.base}/{wildcards.method}/{wildcards.combo}.json"
    return []


def get_validation_task_yamls(wildcards):
    return [f"results/tasks/{t}_validation.yaml" for t in COMBOS[wildcards.combo]]


def get_eval_task_yamls(wildcards):
    return [f"results/tasks/{t}_{s}.yaml" for t in PROCEDURAL_TASKS for s in EVAL_SPLITS]


def merge_output(path):
    return temp(directory(path)) if config["merge"]["temporary"] else directory(path)


def get_stats_data(wildcards):
    return f"results/data/{wildcards.task}/{STATS['split']}.jsonl"


def evaluate_params():
    """Settings shared by both evaluation rules (the model comes from the rule)."""
    return dict(
        tasks=[[t, s] for t in PROCEDURAL_TASKS for s in EVAL_SPLITS],
        lm_eval_tasks={t: LM_EVAL_TASKS[t] for t in ALL_TASKS if t in LM_EVAL_TASKS},
        backend=config["evaluate"]["backend"],
        batch_size=config["evaluate"]["batch_size"],
        limit=config["evaluate"]["limit"],
        seed=config["seed"],
    )


def get_cross_seed_inputs(wildcards):
    experts_a, experts_b = CROSS_SEED.experts(wildcards.combo)
    tasks = COMBOS[wildcards.combo]
    return {
        "experts_a": experts_a,
        "experts_b": experts_b,
        "data": [f"results/data/{t}/validation.jsonl" for t in tasks],
    }


def get_merge_data_inputs(wildcards):
    """Statistics (compute_stats) or validation data (a fit) that a data-aware method reads."""
    method = get_method(METHODS[wildcards.method]["method"])
    tasks = COMBOS[wildcards.combo]
    inputs = {}
    if method.needs_stats_rule:
        inputs["stats"] = [f"results/stats/{wildcards.base}/{t}" for t in tasks]
    if method.needs_data:
        inputs["data"] = [f"results/data/{t}/{STATS['split']}.jsonl" for t in tasks]
    return inputs


# --- resources of every job (mergescale.resources): memory from the checkpoints a job
# holds, a GPU for forward passes when the run declares GPUs, wall time from the size.
def _declared_gpus():
    value = workflow.global_resources.get("gpu")  # profile `resources: [gpu=N]`
    return getattr(value, "value", value)


DECLARED_GPUS = _declared_gpus()


def job_base_and_k(wildcards):
    """The base whose checkpoints a job holds, and how many experts (1 without a subset)."""
    names = wildcards.keys()
    if "base" in names:
        base = wildcards.base
    elif "model" in names or "group" in names:  # {kind}/{base}/... (evaluate, evaluate_batch)
        base = (wildcards.model if "model" in names else wildcards.group).split("/")[1]
    else:  # barrier: the cross-seed study's first base
        base = CROSS_SEED.base_a if CROSS_SEED else GRID_BASES[0]
    if base not in config["bases"]:  # a group such as sparse/{base}/{task}
        base = GRID_BASES[0]
    path = "/".join(str(v) for v in wildcards)
    combo = re.search(r"\bk(\d+)s\d+\b", path)
    return base, int(combo.group(1)) if combo else 1


def train_settings(rule_name, wildcards, base):
    if rule_name == "pretrain_base":
        return config["bases"][base]["pretrain"]
    if rule_name == "instruct_base":
        return config["bases"][base]["train"]
    if rule_name == "finetune_multitask":
        return multitask_train_config(base, wildcards.taskset)
    return expert_train_config(base)


def rule_resources(rule_name, work=None):
    """Snakemake `resources:` of a rule: mem_mb, runtime (minutes), gpu and cpus_per_task
    as functions of each job's wildcards; `work` (a Work, or a function of the wildcards
    returning one) replaces the rule's entry in mergescale.resources.WORK."""

    def plan(wildcards):
        base, k = job_base_and_k(wildcards)
        w = work(wildcards) if callable(work) else (work or RESOURCE_WORK[rule_name])
        return base, k, w

    def mem_mb(wildcards, attempt):
        base, k, w = plan(wildcards)
        gpu = gpus_for(rule_name, DECLARED_GPUS, w) > 0
        mb = memory_mb(
            rule_name, model_size(config, base), k, config["merge"]["dtype"], gpu, w, config["evaluate"]["backend"]
        )
        return int(mb * (1 + 0.5 * (attempt - 1)))  # a retry gets half as much again

    def runtime(wildcards, attempt):
        base, k, w = plan(wildcards)
        train = train_settings(rule_name, wildcards, base) if w.kind == "train" else {}
        minutes = runtime_min(
            rule_name, model_size(config, base), k, train.get("steps", 0), train.get("batch_size", 0), w
        )
        return minutes * attempt

    def gpu(wildcards):
        return gpus_for(rule_name, DECLARED_GPUS, plan(wildcards)[2])

    def cpus_per_task(wildcards):
        return cpus_for(plan(wildcards)[2], workflow.resource_settings.max_threads)

    return dict(mem_mb=mem_mb, runtime=runtime, gpu=gpu, cpus_per_task=cpus_per_task)


def merge_rule_work(wildcards):
    return merge_work(get_method(METHODS[wildcards.method]["method"]))


def rule_method_work(wildcards):
    return work_of_rule_method(METHODS[wildcards.method]["rule"])


def task_vector_work(wildcards):
    """Every held-in expert of the base at once (the job has no subset to count them)."""
    every = RESOURCE_WORK["compute_task_vector_stats"]
    return Work(every.kind, models=lambda k: every.models(len(HELD_IN)), forward=every.forward)


def evaluate_work(wildcards):
    """An ensemble or a rule-method's model spec (Twin-Merging) holds its k experts (and the base) at once."""
    kind, base, *rest = wildcards.model.split("/")
    if kind == "ensembles":
        return Work("evaluate", models=lambda k: k)
    if kind == "merged" and rest[0] in RULE_METHODS and rule_method(rest[0]).output == "model_spec":
        return Work("evaluate", models=lambda k: k + 1)
    return RESOURCE_WORK["evaluate"]


# Fail before any job runs: what the jobs need that the profile or this environment
# cannot give. The profile is checked when the workflow is parsed; the environment when
# jobs are about to run (a dry run only plans, e.g. on a login node without vllm).
FORWARD_RULES = (
    [r for r, w in RESOURCE_WORK.items() if w.forward and r != "merge_rule_method"]
    + (["merge"] if any(merge_work(get_method(s["method"])).forward for s in METHODS.values() if "method" in s) else [])
    + (["merge_rule_method"] if any(work_of_rule_method(METHODS[m]["rule"]).forward for m in RULE_METHODS) else [])
)
check_gpu_placement(FORWARD_RULES, DECLARED_GPUS, workflow.resource_settings.overwrite_resources or {}, cluster=False)


onstart:
    check_backend(config["evaluate"]["backend"])
    check_gpu_placement(FORWARD_RULES, DECLARED_GPUS, {}, cluster=workflow.non_local_exec)
