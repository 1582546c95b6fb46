# LoRA-LEGO (src/mergescale/rule_methods/lora_lego.py): the rank-one units of the experts' LoRA
# adapters (results/experts/{base}/{task}/adapter/) clustered into the target rank,
# averaged, rescaled and applied to the base. Writes a full checkpoint (+ the merged
# adapter in adapter/ and the merge card). Runs on bases whose experts are LoRA
# fine-tunes (`bases:` of the method entry).

from mergescale.rule_methods.lora_lego import check_lora_bases

# A base whose experts are not LoRA fine-tunes has no adapters to merge: fail before any job.
for _name in methods_of_rule("lora_lego"):
    check_lora_bases(config, _name)


rule merge_lora_lego:
    input:
        base="results/bases/{base}",
        experts=get_expert_dirs,
        code=package_source("mergescale.rule_methods.lora_lego"),
    output:
        merge_output("results/merged/{base}/{method}/{combo}"),
    log:
        "results/logs/merge/{base}/{method}/{combo}.log",
    benchmark:
        "results/benchmarks/merge/{base}/{method}/{combo}.tsv"
    wildcard_constraints:
        method=methods_using("lora_lego"),
    params:
        params=method_params,
        dtype=config["merge"]["dtype"],
        seed=config["seed"],
    threads: 1
    resources:
        **rule_resources("merge_lora_lego"),
    script:
        "../../scripts/lora_lego.py"
