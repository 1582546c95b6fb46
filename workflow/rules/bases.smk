rule pretrain_base:
    input:
        unpack(lambda wc: train_files(ALL_TASKS)),
    output:
        directory("results/bases/{base}"),
    log:
        "results/logs/pretrain_base/{base}.log",
    benchmark:
        "results/benchmarks/pretrain_base/{base}.tsv"
    wildcard_constraints:
        base=name_regex(bases_with_source("pretrain")),
    params:
        shape=lambda wc: config["bases"][wc.base]["shape"],
        train=lambda wc: config["bases"][wc.base]["pretrain"],
    threads: 1
    resources:
        mem_mb=2000,
    script:
        "../scripts/pretrain_base.py"
