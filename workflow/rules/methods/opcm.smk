# Continual merging by orthogonal projection (src/mergescale/rule_methods/opcm.py): experts arrive
# one at a time. Writes the merge contract (checkpoint + merge card) and the scores of
# every intermediate merge, for several arrival orders, next to the two baselines.
OPCM_METHODS = methods_of_rule("opcm")
if OPCM_METHODS:
    EXTRA_FINAL_OUTPUT.append("results/plots/continual.png")


rule merge_opcm:
    input:
        base="results/bases/{base}",
        experts=get_expert_dirs,
        tasks=lambda wc: [f"results/tasks/{t}_test.yaml" for t in COMBOS[wc.combo]],
        code=package_source("mergescale.rule_methods.opcm"),
    output:
        model=merge_output("results/merged/{base}/{method}/{combo}"),
        curves="results/continual/{base}/{combo}/{method}.csv",
    log:
        "results/logs/merge/{base}/{method}/{combo}.log",
    benchmark:
        "results/benchmarks/merge/{base}/{method}/{combo}.tsv"
    wildcard_constraints:
        method=one_of(OPCM_METHODS),
    params:
        tasks=lambda wc: COMBOS[wc.combo],
        params=lambda wc: METHODS[wc.method].get("params", {}),
        dtype=config["merge"]["dtype"],
        seed=config["seed"],
        batch_size=config["evaluate"]["batch_size"],
        limit=config["evaluate"]["limit"],
    threads: 1
    resources:
        **rule_resources("merge_opcm"),
    script:
        "../../scripts/opcm.py"


localrules:
    plot_continual,


rule plot_continual:
    input:
        curves=[
            f"results/continual/{base}/{combo}/{method}.csv"
            for base in GRID_BASES
            for method in OPCM_METHODS
            for combo in method_combos(method, base)
        ],
        experts=expand("results/evals/experts/{base}/{task}/scores.json", base=GRID_BASES, task=HELD_IN),
    output:
        report(
            "results/plots/continual.png",
            caption="../../report/continual.rst",
            category="Figures",
        ),
        "results/tables/continual.csv",
    log:
        "results/logs/plot_continual.log",
    script:
        "../../scripts/plot_continual.py"
