# MAP amortised Pareto fronts (src/mergescale/rule_methods/map_pareto.py): probe task-arithmetic
# merges on validation, fit quadratics, pick front points. Writes the merge contract
# (the front point with the best predicted mean) and every point of the front.
MAP_METHODS = methods_of_rule("map")
if MAP_METHODS:
    EXTRA_FINAL_OUTPUT.extend(["results/tables/map.md", "results/plots/map_front.png"])


rule merge_map:
    input:
        unpack(get_rule_method_inputs),
    output:
        model=merge_output("results/merged/{base}/{method}/{combo}"),
        front="results/pareto/{base}/{combo}/{method}.csv",
    log:
        "results/logs/merge_rule_method/{method}/{base}/{combo}.log",
    benchmark:
        "results/benchmarks/merge_rule_method/{method}/{base}/{combo}.tsv"
    wildcard_constraints:
        method=methods_using("map"),
    conda:
        SOFTWARE
    threads: 1
    resources:
        **rule_resources("merge_map"),
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
    report_map,


rule report_map:
    input:
        fronts=[
            f"results/pareto/{base}/{combo}/{method}.csv"
            for base in GRID_BASES
            for method in MAP_METHODS
            for combo in method_combos(method, base)
        ],
    output:
        table=report("results/tables/map.md", caption="../../report/map.rst", category="Tables"),
        csv="results/tables/map.csv",
        plot=report("results/plots/map_front.png", caption="../../report/map.rst", category="Figures"),
    log:
        "results/logs/report_map.log",
    conda:
        SOFTWARE
    script:
        "../../scripts/report_map.py"
