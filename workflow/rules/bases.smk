rule pretrain_base:
    input:
        unpack(lambda wc: train_files(PRETRAIN_TASKS)),
    output:
        directory("results/bases/{base}"),
    log:
        "results/logs/pretrain_base/{base}.log",
    benchmark:
        "results/benchmarks/pretrain_base/{base}.tsv"
    wildcard_constraints:
        base=one_of(PRETRAINED_BASES),
    conda:
        SOFTWARE
    threads: 1
    resources:
        **rule_resources("pretrain_base"),
    params:
        shape=lambda wc: config["bases"][wc.base]["shape"],
        train=lambda wc: config["bases"][wc.base]["pretrain"],
    script:
        "../scripts/pretrain_base.py"


# An "instruction-tuned" base (the paper's PaLM-2-IT): another base further trained on
# the answers of the instruction-tuning families, disjoint from held-in and held-out ones.
rule instruct_base:
    input:
        unpack(lambda wc: train_files(INSTRUCT_TASKS)),
        unpack(lambda wc: replay_files(config["bases"][wc.base]["train"])),
        base=lambda wc: f"results/bases/{config['bases'][wc.base]['from']}",
    output:
        directory("results/bases/{base}"),
    log:
        "results/logs/instruct_base/{base}.log",
    benchmark:
        "results/benchmarks/instruct_base/{base}.tsv"
    wildcard_constraints:
        base=one_of(INSTRUCT_BASES),
    conda:
        SOFTWARE
    threads: 1
    resources:
        **rule_resources("instruct_base"),
    params:
        train=lambda wc: {"seed": config["seed"], **config["bases"][wc.base]["train"]},
        stage="instruct_base",
        chat_template=lambda wc: uses_chat_template(wc.base),
    script:
        "../scripts/finetune.py"


localrules:
    link_variant_base,


# A variant: another base's weights, hard-linked (or copied) and verified, so that the
# variant's experts (its own fine-tuning settings) have a base of their own.
rule link_variant_base:
    input:
        base=lambda wc: f"results/bases/{config['bases'][wc.base]['from']}",
    output:
        directory("results/bases/{base}"),
    log:
        "results/logs/link_variant_base/{base}.log",
    wildcard_constraints:
        base=one_of(VARIANT_BASES),
    conda:
        SOFTWARE
    params:
        source=lambda wc: {"path": f"results/bases/{config['bases'][wc.base]['from']}"},
    script:
        "../scripts/download.py"
