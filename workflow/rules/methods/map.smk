# MAP amortised Pareto fronts (src/mergescale/rule_methods/map_pareto.py): probe task-arithmetic
# merges on validation, fit quadratics, pick front points. Writes the merge contract
# (the front point with the best predicted mean) and every point of the front.
MAP_METHODS = methods_of_rule("map")
if MAP_METHODS:
    EXTRA_FINAL_OUTPUT.extend(["results/tables/map.md", "results/plots/map_front.png"])


rule merge_map:
    input:
        base="results/bases/{base}",
        experts=get_expert_dirs,
        tasks=lambda wc: [f"results/tasks/{t}_validation.yaml" for t in COMBOS[wc.combo]],
        code=package_source("mergescale.rule_methods.map_pareto"),
    output:
        model=merge_output("results/merged/{base}/{method}/{combo}"),
        front="results/pareto/{base}/{combo}/{method}.csv",
    log:
        "results/logs/merge/{base}/{method}/{combo}.log",
    benchmark:
        "results/benchmarks/merge/{base}/{method}/{combo}.tsv"
    wildcard_constraints:
        method=one_of(MAP_METHODS),
    params:
        tasks=lambda wc: COMBOS[wc.combo],
        params=lambda wc: METHODS[wc.method].get("params", {}),
        dtype=config["merge"]["dtype"],
        seed=config["seed"],
        batch_size=config["evaluate"]["batch_size"],
        limit=config["evaluate"]["limit"],
    threads: 1
    resources:
        **rule_resources("merge_map"),
    script:
        "../../scripts/map_pareto.py"


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
    script:
        "../../scripts/report_map.py"
