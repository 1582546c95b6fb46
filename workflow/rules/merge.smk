rule merge:
    input:
        base="results/bases/{base}",
        experts=get_expert_dirs,
        method_source=get_method_source,
    output:
        merge_output("results/merged/{base}/{method}/{combo}"),
    log:
        "results/logs/merge/{base}/{method}/{combo}.log",
    benchmark:
        "results/benchmarks/merge/{base}/{method}/{combo}.tsv"
    wildcard_constraints:
        method=one_of(GENERIC_METHODS),
    params:
        method=lambda wc: METHODS[wc.method]["method"],
        params=lambda wc: METHODS[wc.method].get("params", {}),
        dtype=config["merge"]["dtype"],
        seed=config["seed"],
    threads: 1
    resources:
        mem_mb=2000,
    script:
        "../scripts/merge.py"
