# Config validation, wildcard constraints, target lists and input functions.
import sys
from pathlib import Path

from snakemake.utils import validate

# The package lives in src/; a source checkout works without installing it.
sys.path.insert(0, str(Path(workflow.basedir).parent / "src"))

from mergescale.combos import expert_subsets
from mergescale.config import check_semantics
from mergescale.merge import get_method

validate(config, "../schemas/config.schema.yaml")
check_semantics(config)

HELD_IN = config["tasks"]["held_in"]
HELD_OUT = config["tasks"]["held_out"]
ALL_TASKS = HELD_IN + HELD_OUT
BASES = list(config["bases"])
METHODS = config["merge"]["methods"]
COMBOS = expert_subsets(
    HELD_IN, config["merge"]["ks"], config["merge"]["subsets_per_k"], config["seed"]
)
EVAL_SPLITS = config["evaluate"]["splits"]
SPLITS = ["train", "validation", "test"]
# Methods that are rules of their own (`rule:` in their entry, workflow/rules/methods/);
# the generic merge rule leaves their outputs to them.
RULE_METHODS = [m for m, spec in METHODS.items() if "rule" in spec]
GENERIC_METHODS = [m for m in METHODS if m not in RULE_METHODS]
EXTRA_FINAL_OUTPUT = []  # figures and tables that method rules add to `rule all`


wildcard_constraints:
    base="|".join(map(re.escape, BASES)),
    task="|".join(map(re.escape, ALL_TASKS)),
    split="|".join(SPLITS),
    method="[A-Za-z0-9][A-Za-z0-9_.-]*",
    combo=r"k\d+s\d+|all",


def model_dirs():
    """Every model the workflow evaluates, as a path below results/."""
    out = []
    for base in BASES:
        out.append(f"bases/{base}")
        out += [f"experts/{base}/{task}" for task in HELD_IN]
        out.append(f"multitask/{base}/all")
        out += [f"merged/{base}/{m}/{c}" for m in METHODS for c in COMBOS]
    return out


def get_final_output():
    return [
        "results/tables/scores.csv",
        "results/tables/summary.md",
        "results/plots/normalized_vs_k.png",
    ] + EXTRA_FINAL_OUTPUT


def methods_of_rule(rule):
    """Config names of the methods implemented by workflow/rules/methods/<rule>.smk."""
    return [m for m in RULE_METHODS if METHODS[m]["rule"] == rule]


def one_of(names):
    """A wildcard constraint matching exactly `names` (nothing when empty)."""
    return "|".join(map(re.escape, names)) or "(?!)"


def train_files(tasks):
    return {t: f"results/data/{t}/train.jsonl" for t in tasks}


def get_expert_dirs(wildcards):
    return [f"results/experts/{wildcards.base}/{t}" for t in COMBOS[wildcards.combo]]


def get_method_source(wildcards):
    # The file that implements the method: editing it re-runs only its merges.
    return get_method(METHODS[wildcards.method]["method"]).source_file


def get_eval_task_yamls(wildcards):
    return [f"results/tasks/{t}_{s}.yaml" for t in ALL_TASKS for s in EVAL_SPLITS]


def merge_output(path):
    return temp(directory(path)) if config["merge"]["temporary"] else directory(path)
