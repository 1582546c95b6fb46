rule compute_stats:
    input:
        expert="results/experts/{base}/{task}",
        data=get_stats_data,
    output:
        directory("results/stats/{base}/{task}"),
    log:
        "results/logs/compute_stats/{base}/{task}.log",
    benchmark:
        "results/benchmarks/compute_stats/{base}/{task}.tsv"
    conda:
        SOFTWARE
    threads: 1
    resources:
        **rule_resources("compute_stats"),
    params:
        examples=STATS["examples"],
    script:
        "../scripts/stats.py"
