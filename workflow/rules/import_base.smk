# Bases shipped as a GGUF file inside a Python package (config: source: gguf),
# dequantised once and saved as a safetensors checkpoint with tokenizer and chat template.
rule import_base:
    output:
        directory("results/bases/{base}"),
    log:
        "results/logs/import_base/{base}.log",
    benchmark:
        "results/benchmarks/import_base/{base}.tsv"
    wildcard_constraints:
        base=one_of(bases_with_source("gguf")),
    conda:
        SOFTWARE
    threads: 1
    resources:
        **rule_resources("import_base"),
    params:
        package=lambda wc: config["bases"][wc.base]["gguf"]["package"],
        file=lambda wc: config["bases"][wc.base]["gguf"]["file"],
    script:
        "../scripts/import_base.py"
