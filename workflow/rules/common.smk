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
    ]


def bases_with_source(source):
    return [b for b, spec in config["bases"].items() if spec["source"] == source]


def name_regex(names):
    # A rule whose wildcard may match no configured name matches nothing.
    return "|".join(map(re.escape, names)) or "(?!)"


def uses_chat_template(base):
    return config["bases"][base].get("chat_template", False)


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
