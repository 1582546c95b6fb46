# Continual merging by orthogonal projection (src/mergescale/rule_methods/opcm.py): experts arrive
# one at a time. Writes the merge contract (checkpoint + merge card) and the scores of
# every intermediate merge, for several arrival orders, next to the two baselines.
OPCM_METHODS = methods_of_rule("opcm")
if OPCM_METHODS:
    EXTRA_FINAL_OUTPUT.append("results/plots/continual.png")


rule merge_opcm:
    input:
        unpack(get_rule_method_inputs),
    output:
        model=merge_output("results/merged/{base}/{method}/{combo}"),
        curves="results/continual/{base}/{combo}/{method}.csv",
    log:
        "results/logs/merge_rule_method/{method}/{base}/{combo}.log",
    benchmark:
        "results/benchmarks/merge_rule_method/{method}/{base}/{combo}.tsv"
    wildcard_constraints:
        method=methods_using("opcm"),
    conda:
        SOFTWARE
    threads: 1
    resources:
        **rule_resources("merge_opcm"),
    params:
        rule=rule_method_name,
        params=method_params,
        tasks=subset_tasks,
        evaluate=EVALUATE_SETTINGS,
        dtype=config["merge"]["dtype"],
        seed=config["seed"],
    script:
        "../../scripts/merge_rule_method.py"


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
    conda:
        SOFTWARE
    script:
        "../../scripts/plot_continual.py"
