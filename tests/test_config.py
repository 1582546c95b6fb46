"""Config validation: every shipped config is valid; each mistake names its key."""

import copy
from pathlib import Path

import pytest
import yaml

from mergescale.config import ConfigError, check_schema, check_semantics, load_config

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "config").glob("*.yaml"))
DEFAULT = yaml.safe_load((REPO / "config" / "config.yaml").read_text())


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    load_config(path)


def _check(config):
    check_schema(config)
    check_semantics(config)


def _mutated(edit):
    config = copy.deepcopy(DEFAULT)
    edit(config)
    return config


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(extra_key=1), r"Additional properties.*extra_key"),
        (lambda c: c["merge"].update(mergeReads=True), r"config key merge: .*mergeReads"),
        (lambda c: c["tasks"]["held_in"].append("frist_letter"), r"tasks.held_in: .*frist_letter.*first_letter"),
        (lambda c: c["tasks"]["held_out"].append("first_letter"), r"tasks.held_out: .*also held-in"),
        (lambda c: c["merge"]["methods"].update(x={"method": "tie"}), r"merge.methods.x: .*unknown merge method 'tie'.*ties"),
        (lambda c: c["merge"]["methods"]["ties"].setdefault("params", {}).update(density=1.5), r"merge.methods.ties: .*density"),
        (lambda c: c["merge"]["methods"]["ties"].setdefault("params", {}).update(densty=0.5), r"merge.methods.ties: .*densty"),
        (lambda c: c["merge"].update(ks=[2, 7]), r"merge.ks: k=7 .* only 6"),
        (lambda c: c["data"]["sizes"].update(test=0), r"data.sizes.test"),
        (lambda c: c["bases"]["tiny-s"]["shape"].update(num_attention_heads=3), r"bases.tiny-s.shape: .*divisible"),
        (lambda c: c["bases"]["tiny-s"].pop("pretrain"), r"bases.tiny-s.pretrain: required"),
        (lambda c: c["finetune"]["expert"].update(lr=-1), r"finetune.expert.lr"),
        (lambda c: c["evaluate"].update(backend="tgi"), r"evaluate.backend"),
        (lambda c: c["merge"]["methods"]["ties"].update(ks=[3]), r"merge.methods.ties.ks: \[3\] not in merge.ks"),
        (lambda c: c["merge"].update(stats={"split": "test"}), r"merge.stats.split"),
        (lambda c: c["merge"]["methods"]["regmean"]["params"].update(alpha=1.5), r"merge.methods.regmean: .*alpha"),
    ],
)
def test_bad_config_names_the_key(edit, message):
    with pytest.raises(ConfigError, match=message):
        _check(_mutated(edit))
