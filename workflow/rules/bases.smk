rule pretrain_base:
    input:
        unpack(lambda wc: train_files(PROCEDURAL_TASKS)),
    output:
        directory("results/bases/{base}"),
    log:
        "results/logs/pretrain_base/{base}.log",
    benchmark:
        "results/benchmarks/pretrain_base/{base}.tsv"
    wildcard_constraints:
        base=one_of([b for b in BASES if b not in FETCHED_BASES]),
    params:
        shape=lambda wc: config["bases"][wc.base]["shape"],
        train=lambda wc: config["bases"][wc.base]["pretrain"],
    threads: 1
    resources:
        mem_mb=2000,
    script:
        "../scripts/pretrain_base.py"
