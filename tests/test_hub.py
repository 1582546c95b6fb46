"""Fetching base and expert models: hub snapshots (offline, from a cache the test lays out
the way huggingface_hub does) and local directories, with verification and refusals."""

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mergescale.sources.hub import SOURCE_CARD, ModelSourceError, fetch_model
from mergescale.models.llama import TinyShape, new_llama, save_model
from mergescale.tasks import ALPHABET
from mergescale.models.tokenizer import build_char_tokenizer
from workflow_helpers import REPO, snakemake

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO_ID = "tiny-org/tiny-llama"


def tiny_checkpoint(path: Path, sharded: bool = False, seed: int = 0) -> Path:
    tokenizer = build_char_tokenizer(ALPHABET)
    model = new_llama(TinyShape(16, 2, 2, 32), tokenizer, seed=seed)
    save_model(model, tokenizer, path)
    if sharded:  # re-save the weights as several shards with an index
        (path / "model.safetensors").unlink()
        model.save_pretrained(path, safe_serialization=True, max_shard_size="20KB")
        assert (path / "model.safetensors.index.json").is_file()
    return path


def seed_hub_cache(cache: Path, repo: str, commit: str, source: Path, ref: str = "main") -> Path:
    """Lay out ``source``'s files as huggingface_hub caches a download: content-addressed
    blobs, a snapshot of relative symlinks per commit, and a ref naming the commit."""
    storage = cache / ("models--" + repo.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    for file in sorted(p for p in source.rglob("*") if p.is_file()):
        rel = file.relative_to(source)
        data = file.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def offline_home(tmp_path, monkeypatch):
    """HF_HOME in tmp_path, offline; the hub cache is HF_HOME/hub."""
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def _tensors(path: Path) -> dict:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_hub_snapshot_arrives_verified_without_pickles(tmp_path, offline_home):
    src = tiny_checkpoint(tmp_path / "src", sharded=True)
    torch.save({"w": torch.zeros(2)}, src / "pytorch_model.bin")  # must not be copied
    (src / "original").mkdir()
    torch.save({"w": torch.zeros(2)}, src / "original" / "consolidated.00.pth")
    (src / "README.md").write_text("model card\n")
    seed_hub_cache(offline_home / "hub", REPO_ID, COMMIT, src)

    out = tmp_path / "results" / "bases" / "hubbase"
    card = fetch_model({"repo": REPO_ID, "revision": COMMIT}, out, log=lambda m: None)
    got = sorted(p.name for p in out.iterdir())
    shards = sorted(p.name for p in src.glob("model-*.safetensors"))
    assert len(shards) >= 2
    assert got == sorted(["config.json", "generation_config.json", "model.safetensors.index.json",
                          "tokenizer.json", "tokenizer_config.json", SOURCE_CARD, *shards])
    assert card["commit"] == COMMIT and card["repo"] == REPO_ID
    assert json.loads((out / SOURCE_CARD).read_text())["files"]["config.json"] == (src / "config.json").stat().st_size
    expected, fetched = _tensors(src), _tensors(out)
    assert expected.keys() == fetched.keys()
    assert all(torch.equal(expected[k], fetched[k]) for k in expected)
    assert not list(out.parent.glob(".*.tmp"))  # nothing left from the atomic write


def test_branch_revision_resolves_through_refs(tmp_path, offline_home):
    src = tiny_checkpoint(tmp_path / "src")
    seed_hub_cache(offline_home / "hub", REPO_ID, COMMIT, src, ref="main")
    logs = []
    card = fetch_model({"repo": REPO_ID, "revision": "main"}, tmp_path / "out", log=logs.append)
    assert card["commit"] == COMMIT
    assert any("not a commit hash" in m for m in logs)


def test_hf_hub_cache_overrides_hf_home(tmp_path, offline_home, monkeypatch):
    src = tiny_checkpoint(tmp_path / "src")
    cache = tmp_path / "elsewhere"
    seed_hub_cache(cache, REPO_ID, COMMIT, src)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    fetch_model({"repo": REPO_ID, "revision": COMMIT}, tmp_path / "out", log=lambda m: None)
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_pickle_only_repo_is_refused(tmp_path, offline_home):
    src = tmp_path / "src"
    tiny_checkpoint(src)
    (src / "model.safetensors").unlink()
    torch.save({"w": torch.zeros(2)}, src / "pytorch_model.bin")
    seed_hub_cache(offline_home / "hub", REPO_ID, COMMIT, src)
    out = tmp_path / "out"
    with pytest.raises(ModelSourceError, match=r"tiny-org/tiny-llama@0123.*pytorch_model\.bin.*refused"):
        fetch_model({"repo": REPO_ID, "revision": COMMIT}, out, log=lambda m: None)
    assert not out.exists()


def test_corrupted_shard_is_refused(tmp_path, offline_home):
    src = tiny_checkpoint(tmp_path / "src", sharded=True)
    shard = sorted(src.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated download
    seed_hub_cache(offline_home / "hub", REPO_ID, COMMIT, src)
    out = tmp_path / "out"
    with pytest.raises(ModelSourceError, match=rf"tiny-org/tiny-llama.*{shard.name}.*truncated"):
        fetch_model({"repo": REPO_ID, "revision": COMMIT}, out, log=lambda m: None)
    assert not out.exists()


def test_trailing_bytes_are_a_size_mismatch(tmp_path):
    src = tiny_checkpoint(tmp_path / "src")
    with open(src / "model.safetensors", "ab") as fh:
        fh.write(b"\0" * 16)
    with pytest.raises(ModelSourceError, match=r"model\.safetensors: size mismatch"):
        fetch_model({"path": str(src)}, tmp_path / "out", log=lambda m: None)


def test_index_naming_a_missing_shard_is_refused(tmp_path):
    src = tiny_checkpoint(tmp_path / "src", sharded=True)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "model-00009-of-00009.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelSourceError, match=r"lists shard model-00009-of-00009\.safetensors"):
        fetch_model({"path": str(src)}, tmp_path / "out", log=lambda m: None)


def test_broken_config_is_refused(tmp_path):
    src = tiny_checkpoint(tmp_path / "src")
    (src / "config.json").write_text("{not json")
    with pytest.raises(ModelSourceError, match=r"config\.json does not load"):
        fetch_model({"path": str(src)}, tmp_path / "out", log=lambda m: None)


def test_missing_revision_is_refused(tmp_path, offline_home):
    for spec in ({"repo": REPO_ID}, {"repo": REPO_ID, "revision": ""}):
        with pytest.raises(ModelSourceError, match=r"tiny-org/tiny-llama: a revision is required"):
            fetch_model(spec, tmp_path / "out", log=lambda m: None)


def test_offline_and_not_cached_says_so(tmp_path, offline_home):
    with pytest.raises(ModelSourceError, match=r"tiny-org/tiny-llama@0123.*download failed \(offline, cache"):
        fetch_model({"repo": REPO_ID, "revision": COMMIT}, tmp_path / "out", log=lambda m: None)


def test_local_directory_is_verified_and_linked(tmp_path):
    src = tiny_checkpoint(tmp_path / "src")
    torch.save({"w": torch.zeros(2)}, src / "pytorch_model.bin")
    out = tmp_path / "out"
    card = fetch_model({"path": str(src)}, out, log=lambda m: None)
    assert card["source"] == "local" and not (out / "pytorch_model.bin").exists()
    assert (out / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").unlink()
    with pytest.raises(ModelSourceError, match=r"only pickle weights \(pytorch_model\.bin\)"):
        fetch_model({"path": str(src)}, tmp_path / "out2", log=lambda m: None)


def test_download_base_rule_runs_offline(tmp_path):
    """The download_base rule itself, through Snakemake, on a config whose base is a hub
    repo in a pre-seeded cache, with HF_HOME and HF_HUB_OFFLINE passed to the job."""
    home = tmp_path / "hf_home"
    src = tiny_checkpoint(tmp_path / "src")
    seed_hub_cache(home / "hub", REPO_ID, COMMIT, src)
    config = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())
    config["bases"] = {"hubbase": {"source": "hub", "repo": REPO_ID, "revision": COMMIT}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    work = tmp_path / "work"
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(REPO / "src")}
    env.pop("HF_HUB_CACHE", None)
    snakemake(work, "--cores", "1", "results/bases/hubbase", config=path, env=env, timeout=300)
    out = work / "results" / "bases" / "hubbase"
    assert json.loads((out / SOURCE_CARD).read_text())["commit"] == COMMIT
    assert (out / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    log = (work / "results" / "logs" / "download_base" / "hubbase.log").read_text()
    assert "files verified" in log
