# Config validation, wildcard constraints, target lists and input functions.
import sys
from pathlib import Path

from snakemake.utils import validate

# The package lives in src/; a source checkout works without installing it.
sys.path.insert(0, str(Path(workflow.basedir).parent / "src"))

from mergescale.combos import ALL_HELD_IN, expert_subsets, parse_combo
from mergescale.config import check_schema, check_semantics
from mergescale.evaluate import check_backend
from mergescale.grid import (REPLAY_PREFIX, base_labels, finetune_settings, instruct_tasks,
                             pretrain_tasks, uses_replay)
from mergescale.atlas_study import atlas_plan
from mergescale.cross_seed_study import cross_seed_plan
from mergescale.sparse_soups_study import sparse_soups_plan
from mergescale.merge import get_method
from mergescale.resources import (
    WORK as RESOURCE_WORK,
    Work,
    check_gpu_placement,
    cpus_for,
    gpus_for,
    memory_mb,
    merge_work,
    model_size,
    runtime_min,
)
from mergescale.sources import (
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
# Methods that are rules of their own (`rule:` in the config, workflow/rules/methods/).
RULE_METHODS = [name for name, spec in METHODS.items() if "rule" in spec]
COMBOS = expert_subsets(
    HELD_IN, config["merge"]["ks"], config["merge"]["subsets_per_k"], config["seed"]
)
# Optional cross-seed study (rules/methods/weight_matching.smk); its base_b is not in the grid.
CROSS_SEED = cross_seed_plan(config, COMBOS)
GRID_BASES = [b for b in BASES if CROSS_SEED is None or b != CROSS_SEED.base_b]
ATLAS = atlas_plan(config, COMBOS) or {}  # optional aTLAS study (rules/methods/atlas.smk)
SPARSE_SOUPS = sparse_soups_plan(config)  # optional Sparse Model Soups (rules/methods/sparse_soups.smk)
EVAL_SPLITS = config["evaluate"]["splits"]
SPLITS = ["train", "validation", "test"]
# Data for the statistics of data-aware methods (and their fits): split and examples.
STATS = {"split": "validation", "examples": 64, **config["merge"].get("stats", {})}
# Model and task sources (hub/local models, public lm-eval tasks): see mergescale.sources.
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
    out = (CROSS_SEED.model_dirs() if CROSS_SEED else []) + list(ATLAS)
    out += SPARSE_SOUPS.model_dirs() if SPARSE_SOUPS else []
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
    experts, and the checkpoints of one base and expert subset (its multitask model and
    the merges of engine methods, aTLAS and cross-seed merging), and the pruned models
    of one sparse-soups task. Empty when evaluation cannot be batched (a backend other
    than hf, public lm-eval tasks, chat templates) or `evaluate.batch` is false; every
    other model gets a job of its own (rule evaluate)."""
    ev = config["evaluate"]
    if not ev.get("batch", True) or ev["backend"] != "hf" or any(t in LM_EVAL_TASKS for t in ALL_TASKS):
        return {}
    checkpoints = set(ATLAS) | set(CROSS_SEED.model_dirs() if CROSS_SEED else [])
    groups = {}
    for path in model_dirs():
        kind, base, *rest = path.split("/")
        if uses_chat_template(base):
            continue
        if kind in ("bases", "experts"):
            groups.setdefault(f"experts/{base}", []).append(path)
        elif kind == "multitask" and rest[0] == ALL_HELD_IN:  # the one reference of a base
            groups.setdefault(f"experts/{base}", []).append(path)
        elif kind == "multitask":
            groups.setdefault(f"merged/{base}/{rest[0]}", []).append(path)
        elif kind == "merged" and (rest[0] in METHODS and rest[0] not in RULE_METHODS or path in checkpoints):
            groups.setdefault(f"merged/{base}/{rest[1]}", []).append(path)
        elif kind == "sparse":  # sparse/{base}/{task}/c{cycle}/{soup,best_copy}
            groups.setdefault(f"sparse/{base}/{rest[0]}", []).append(path)
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
    return [
        "results/tables/scores.csv",
        "results/tables/summary.md",
        "results/findings.md",
        *expand("results/plots/normalized_vs_k_{quality}.png", quality=QUALITIES),
        "results/plots/base_quality.png",
        "results/tables/task_vectors.md",
        *(["results/tables/tuning.md"] if tuning_records() else []),
    ] + (CROSS_SEED.final_outputs() if CROSS_SEED else []) + EXTRA_FINAL_OUTPUT


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
    """Config names of the methods implemented by workflow/rules/methods/<rule>.smk."""
    return [m for m in RULE_METHODS if METHODS[m]["rule"] == rule]


def engine_methods():
    """{method} wildcard of the generic merge rule: every method that is not a rule-method."""
    return one_of([m for m in METHODS if m not in RULE_METHODS])


def methods_using(rule_name):
    """{method} wildcard of a rule-method's rule: the config names with `rule: <rule_name>`."""
    return one_of(methods_of_rule(rule_name))


def method_params(wildcards):
    return METHODS[wildcards.method].get("params", {})


def get_method_source(wildcards):
    # The file that implements the method: editing it re-runs only its merges.
    return get_method(METHODS[wildcards.method]["method"]).source_file


def tuning_records():
    """Every tuning record the grid writes (tuned engine methods on grid bases)."""
    return [f"results/tuning/{base}/{m}/{c}.json" for base in GRID_BASES
            for m in METHODS if "method" in METHODS[m] and METHODS[m].get("tune")
            for c in method_combos(m, base)]


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


def train_settings(rule, wildcards, base):
    if rule == "pretrain_base":
        return config["bases"][base]["pretrain"]
    if rule == "instruct_base":
        return config["bases"][base]["train"]
    if rule == "finetune_multitask":
        return multitask_train_config(base, wildcards.taskset)
    return expert_train_config(base)


def rule_resources(rule, work=None):
    """Snakemake `resources:` of a rule: mem_mb, runtime (minutes), gpu and cpus_per_task
    as functions of each job's wildcards; `work` (a Work, or a function of the wildcards
    returning one) replaces the rule's entry in mergescale.resources.WORK."""

    def plan(wildcards):
        base, k = job_base_and_k(wildcards)
        w = work(wildcards) if callable(work) else (work or RESOURCE_WORK[rule])
        return base, k, w

    def mem_mb(wildcards, attempt):
        base, k, w = plan(wildcards)
        gpu = gpus_for(rule, DECLARED_GPUS, w) > 0
        mb = memory_mb(rule, model_size(config, base), k, config["merge"]["dtype"], gpu, w,
                       config["evaluate"]["backend"])
        return int(mb * (1 + 0.5 * (attempt - 1)))  # a retry gets half as much again

    def runtime(wildcards, attempt):
        base, k, w = plan(wildcards)
        train = train_settings(rule, wildcards, base) if w.kind == "train" else {}
        minutes = runtime_min(rule, model_size(config, base), k, train.get("steps", 0),
                              train.get("batch_size", 0), w)
        return minutes * attempt

    def gpu(wildcards):
        return gpus_for(rule, DECLARED_GPUS, plan(wildcards)[2])

    def cpus_per_task(wildcards):
        return cpus_for(plan(wildcards)[2], workflow.resource_settings.max_threads)

    return dict(mem_mb=mem_mb, runtime=runtime, gpu=gpu, cpus_per_task=cpus_per_task)


def merge_rule_work(wildcards):
    return merge_work(get_method(METHODS[wildcards.method]["method"]))


def task_vector_work(wildcards):
    """Every held-in expert of the base at once (the job has no subset to count them)."""
    every = RESOURCE_WORK["task_vector_stats"]
    return Work(every.kind, models=lambda k: every.models(len(HELD_IN)), forward=every.forward)


def evaluate_work(wildcards):
    """An ensemble or a Twin-Merging spec holds its k experts (and the base) at once."""
    kind, base, *rest = wildcards.model.split("/")
    if kind == "ensembles":
        return Work("evaluate", models=lambda k: k)
    if kind == "merged" and rest[0] in METHODS and METHODS[rest[0]].get("rule") == "twin_merging":
        return Work("evaluate", models=lambda k: k + 1)
    return RESOURCE_WORK["evaluate"]


# Fail before any job runs: what the jobs need that the profile or this environment
# cannot give. The profile is checked when the workflow is parsed; the environment when
# jobs are about to run (a dry run only plans, e.g. on a login node without vllm).
FORWARD_RULES = [r for r, w in RESOURCE_WORK.items() if w.forward] + (
    ["merge"] if any(merge_work(get_method(s["method"])).forward for s in METHODS.values() if "method" in s) else []
)
check_gpu_placement(FORWARD_RULES, DECLARED_GPUS, workflow.resource_settings.overwrite_resources or {}, cluster=False)


onstart:
    check_backend(config["evaluate"]["backend"])
    check_gpu_placement(FORWARD_RULES, DECLARED_GPUS, {}, cluster=workflow.non_local_exec)
