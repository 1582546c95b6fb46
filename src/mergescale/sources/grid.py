"""The study grid as the config describes it: which bases exist, what they are made
from, and the labels (size, base quality) that tables and figures group them by."""

from __future__ import annotations

from mergescale.tasks import ALPHABET
from mergescale.tasks.families import families_with_role
from mergescale.models.tokenizer import char_vocab_size

# Downloaded (hub) and local bases are labelled "pretrained" unless the config says otherwise.
QUALITY_BY_SOURCE = {"instruct": "instruct"}


# Bases made from another base (`from`): trained further, or the same weights reused.
DERIVED_SOURCES = ("instruct", "variant")


def root_base(bases: dict, name: str) -> str:
    """The pretrained base an instruct or variant base descends from (itself for a pretrained one)."""
    seen = [name]
    while bases[name]["source"] in DERIVED_SOURCES:
        name = bases[name]["from"]
        if name in seen:
            raise ValueError(f"bases {' -> '.join(seen + [name])} form a cycle")
        seen.append(name)
    return name


def llama_parameter_count(shape: dict, vocab_size: int) -> int:
    """Parameters of the tiny Llama a shape builds (untied head, no biases), without
    building it: the Snakefile needs the labels while parsing, before torch is loaded."""
    h, i = shape["hidden_size"], shape["intermediate_size"]
    per_layer = 4 * h * h + 3 * h * i + 2 * h  # q/k/v/o, gate/up/down, two RMSNorms
    return 2 * vocab_size * h + shape["num_hidden_layers"] * per_layer + h


def _human(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.0f}k"


def base_labels(bases: dict) -> dict[str, dict]:
    """{base: {size, quality, replicate, parameters}}; labels default to the parameter count
    and the source, the replicate to 0. Parameters are counted from the shape, without
    building the model."""
    vocab = char_vocab_size(ALPHABET)
    out = {}

    def labels(name: str) -> dict:
        if name not in out:
            spec = bases[name]
            if spec["source"] == "variant":  # the same weights: labels of `from` unless given
                parent = labels(spec["from"])
                out[name] = {"size": spec.get("size") or parent["size"],
                             "quality": spec.get("quality") or parent["quality"],
                             "replicate": spec.get("replicate", parent["replicate"]),
                             "parameters": parent["parameters"]}
                return out[name]
            root = bases[root_base(bases, name)]
            params = llama_parameter_count(root["shape"], vocab) if "shape" in root else None
            size = spec.get("size") or root.get("size") or (_human(params) if params else name)
            quality = spec.get("quality") or QUALITY_BY_SOURCE.get(spec["source"], "pretrained")
            replicate = spec.get("replicate", root.get("replicate", 0))
            out[name] = {"size": size, "quality": quality, "replicate": replicate,
                         "parameters": params}
        return out[name]

    for name in bases:
        root_base(bases, name)  # a cycle is an error, not a recursion
        labels(name)
    return {name: out[name] for name in bases}


def finetune_settings(config: dict, base: str, stage: str) -> dict:
    """finetune.<stage> (expert or multitask) with bases.<base>.finetune.<stage> over it:
    a shallow merge, so a base's `lora` block replaces the global one as a whole."""
    own = config["bases"][base].get("finetune", {}).get(stage, {})
    return {**(config.get("finetune") or {}).get(stage, {}), **own}


# Input names of the replay files of a fine-tuning run (``replay__<family>``).
REPLAY_PREFIX = "replay__"


def uses_replay(config: dict) -> bool:
    """Whether any fine-tuning run (an expert, a multitask model, an instruct base) draws
    a share of its batches from the pretraining mixture, so that mixture needs data."""
    runs = [(config.get("finetune") or {}).get(stage, {}) for stage in ("expert", "multitask")]
    for spec in config["bases"].values():
        runs += [spec.get("train", {})] + list(spec.get("finetune", {}).values())
    return any(run.get("replay") for run in runs)


def pretrain_tasks() -> list[str]:
    """The pretraining mixture: primitive skills and generic text (role ``pretrain``);
    no benchmark family (held-in or held-out) is among them."""
    return families_with_role("pretrain")


def instruct_tasks() -> list[str]:
    """The instruction-tuning mixture (role ``instruct``): disjoint from every benchmark
    family, held-in and held-out alike, as the paper's instruction-tuned base is."""
    return families_with_role("instruct")
