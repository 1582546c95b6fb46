# Bases and experts fetched instead of trained: a hub repository at a pinned revision or a
# local directory (mergescale.hub). Local rules: downloads need the network, not a GPU.


rule download_base:
    output:
        directory("results/bases/{base}"),
    log:
        "results/logs/download_base/{base}.log",
    wildcard_constraints:
        base=one_of(FETCHED_BASES),
    params:
        source=lambda wc: model_ref(config["bases"][wc.base]),
    script:
        "../scripts/download.py"


rule download_expert:
    output:
        directory("results/experts/{base}/{task}"),
    log:
        "results/logs/download_expert/{base}/{task}.log",
    wildcard_constraints:
        base=one_of(FETCHED_EXPERT_BASES),
    params:
        source=lambda wc: config["bases"][wc.base]["experts"][wc.task],
    script:
        "../scripts/download.py"
