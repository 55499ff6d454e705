"""The importance-aware sample cache (SHADE): the store, the ranked scores, the cache's
admission and eviction, the sampler's knob, DataLoader workers, a real Lightning run over local
files and over the S3 test server, and the example's LightningCLI YAML."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from examples.sample_cache.data import skewed_workload
from examples.sample_cache.model import Classifier
from viper_lightning._errors import ConfigurationError, IntegrityError
from viper_lightning.data import (CachedSamples, ImportanceDataModule, ImportanceSampler, ImportanceScores,
                                  SampleCache, SampleLossCallback, SampleStore)
from viper_lightning.data._cache import Plan

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def store(tmp_path) -> SampleStore:
    x, y = skewed_workload(200, 8, 0.2, seed=0)
    SampleStore.write(str(tmp_path / "samples"), zip(x, y))
    return SampleStore(str(tmp_path / "samples"))


def test_samples_round_trip_and_bad_ones_are_refused_by_name(store, tmp_path):
    x, y = skewed_workload(200, 8, 0.2, seed=0)
    sample = SampleStore.decode(store.read(7), 7)
    assert torch.equal(sample["x"], x[7]) and torch.equal(sample["y"], y[7])
    assert len(store) == 200 and store.sizes.min() > 0
    (tmp_path / "samples" / "00000003.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(IntegrityError, match="sample 3 .* is 15 bytes, but samples.json says"):
        store.read(3)
    with pytest.raises(IntegrityError, match="sample 3 is not a safetensors file"):
        SampleStore.decode(b"not safetensors", 3)
    (tmp_path / "samples" / "00000004.safetensors").write_bytes(b"x" * 10**6)
    with pytest.raises(IntegrityError, match="sample 4 .* is longer than"):
        store.read(4)
    with pytest.raises(ConfigurationError, match="has no samples.json"):
        SampleStore(str(tmp_path))


def test_scores_rank_the_highest_loss_first_and_unscored_samples_before_all():
    scores = ImportanceScores(5)
    scores.record(np.array([0, 1, 2, 3]), np.array([0.5, 3.0, 0.1, 1.0]))
    assert list(scores.ranks()) == [3, 1, 4, 2, 0]  # sample 4 has no loss yet: first
    probabilities = scores.probabilities()
    assert probabilities.sum() == pytest.approx(1.0)
    assert list(np.argsort(-probabilities)) == [4, 1, 3, 0, 2]


def _scored(losses: list[float]) -> ImportanceScores:
    scores = ImportanceScores(len(losses))
    scores.record(np.arange(len(losses)), np.array(losses))
    return scores


def test_the_importance_cache_keeps_the_most_important_within_its_bytes(tmp_path):
    scores = _scored([5.0, 4.0, 3.0, 2.0, 1.0, 6.0])
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "1").write_bytes(b"planted")  # another run's (or user's) file: never read
    cache = SampleCache(30, np.full(6, 10), scores, "importance", str(tmp_path / "cache"))
    assert cache.directory != str(tmp_path / "cache") and os.listdir(cache.directory) == []
    assert [cache.plan(i) for i in (3, 4, 2)] == [Plan.KEEP] * 3  # room for three
    for index in (3, 4, 2):
        Path(cache.path(index)).write_bytes(b"x")
    assert cache.plan(4) is Plan.READ  # a hit
    assert cache.plan(0) is Plan.KEEP and 4 not in cache  # more important than the least, which goes
    assert not os.path.exists(cache.path(4))
    assert cache.plan(4) is Plan.FETCH and 4 not in cache  # less important than every cached one
    assert cache.used_bytes == 30 and sorted(cache.cached()) == [0, 2, 3]


def test_the_cache_evicts_nothing_for_a_sample_it_then_cannot_admit(tmp_path):
    scores = _scored([9.0, 1.0, 5.0])  # ranks: 0 first, then 2, then 1
    cache = SampleCache(20, np.array([10, 10, 20]), scores, "importance", str(tmp_path))
    assert cache.plan(0) is Plan.KEEP and cache.plan(1) is Plan.KEEP
    # sample 2 needs both places, but sample 0 is more important than it: nothing is evicted
    assert cache.plan(2) is Plan.FETCH and sorted(cache.cached()) == [0, 1] and cache.used_bytes == 20


def test_a_sweep_removes_files_written_after_their_eviction(tmp_path):
    cache = SampleCache(10, np.full(3, 10), None, "lru", str(tmp_path))
    assert cache.plan(0) is Plan.KEEP
    assert cache.plan(1) is Plan.KEEP  # evicts 0 before any worker wrote it...
    Path(cache.path(0)).write_bytes(b"x")  # ...then a worker writes it anyway
    cache.sweep()  # and 1's write never came (a full disk, say)
    assert os.listdir(cache.directory) == [] and len(cache) == 0 and cache.used_bytes == 0


def test_the_lru_cache_evicts_the_least_recently_drawn(tmp_path):
    cache = SampleCache(20, np.full(4, 10), None, "lru", str(tmp_path / "cache"))
    assert [cache.plan(i) for i in (0, 1)] == [Plan.KEEP, Plan.KEEP]
    cache.plan(0)  # a hit refreshes 0
    assert cache.plan(2) is Plan.KEEP and sorted(cache.cached()) == [0, 2]


def test_affinity_zero_is_exact_uniform_sampling_with_weight_one():
    sampler = ImportanceSampler(_scored(list(np.linspace(1, 2, 50))), cache_affinity=0.0)
    drawn = list(sampler)
    assert sorted(index for index, _, _ in drawn) == list(range(50))
    assert {weight for _, _, weight in drawn} == {1.0}
    halves = [ImportanceSampler(_scored(list(np.linspace(1, 2, 50))), cache_affinity=0.0, num_replicas=2, rank=rank)
              for rank in (0, 1)]
    assert sorted(index for half in halves for index, _, _ in half) == list(range(50))  # DDP: a partition


def test_importance_draws_favour_high_ranks_and_weights_undo_the_bias(tmp_path):
    losses = list(np.linspace(0.1, 5.0, 100))
    sampler = ImportanceSampler(_scored(losses), cache_affinity=1.0, num_samples=20000)
    drawn = list(sampler)
    counts = np.bincount([index for index, _, _ in drawn], minlength=100)
    assert counts[90:].sum() > 5 * counts[:10].sum()  # the high losses are drawn far more often
    weighted = np.zeros(100)
    for index, _, weight in drawn:
        weighted[index] += weight
    assert np.isclose(weighted / len(drawn), 1 / 100, rtol=0.5)[20:].all()  # about uniform once weighted


def test_substitution_takes_a_cached_sample_of_similar_rank_only_when_asked(tmp_path):
    losses = list(np.linspace(0.1, 5.0, 100))
    losses[95] = 100.0  # rank 0: nothing drawn can take its place in the cache
    scores = _scored(losses)
    cache = SampleCache(10, np.full(100, 10), scores, "importance", str(tmp_path / "cache"))
    assert cache.plan(95) is Plan.KEEP  # the one cached sample
    Path(cache.path(95)).write_bytes(b"x")  # as its worker would
    plain = ImportanceSampler(scores, cache, cache_affinity=1.0, num_samples=2000)
    assert any(index != 95 for index, _, _ in plain)
    substituting = ImportanceSampler(scores, cache, cache_affinity=1.0, substitute_window=0.03, num_samples=2000)
    ranks = scores.ranks()
    drawn = [index for index, _, _ in substituting]
    assert 95 in drawn and not any(1 <= ranks[index] <= 3 for index in drawn)  # ranks 1-3 became 95


def test_dataloader_workers_share_the_cache_directory(store, tmp_path):
    scores = ImportanceScores(len(store))
    cache = SampleCache(int(store.sizes.sum()), store.sizes, scores, "importance", str(tmp_path / "cache"))
    sampler = ImportanceSampler(scores, cache, cache_affinity=0.0)
    loader = DataLoader(CachedSamples(store, cache.directory), batch_size=16, sampler=sampler, num_workers=2)
    first = [batch for batch in loader]
    assert not any(batch["hit"].any() for batch in first)  # all misses, each admitted...
    assert len(os.listdir(cache.directory)) == len(store)  # ...and written whole by the workers
    sampler.set_epoch(1)
    second = [batch for batch in loader]
    assert all(batch["hit"].all() for batch in second)
    x, _ = skewed_workload(200, 8, 0.2, seed=0)
    for batch in second:
        assert torch.equal(batch["x"], x[batch["index"]])  # a hit is the stored sample


def _fit(root: str, tmp_path: Path, **data_settings) -> tuple[ImportanceDataModule, SampleLossCallback]:
    L.seed_everything(0, verbose=False)
    data = ImportanceDataModule(root, batch_size=20, cache_dir=str(tmp_path / "cache"),
                                **{"num_workers": 0, **data_settings})
    recorder = SampleLossCallback()
    trainer = L.Trainer(max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[recorder], accelerator="cpu", devices=1)
    trainer.fit(Classifier(dim=8), datamodule=data)
    return data, recorder


def test_a_lightning_run_scores_every_sample_and_hits_its_cache(store, tmp_path):
    data, recorder = _fit(store.root, tmp_path, cache_fraction=0.3)
    assert np.isfinite(data.scores._losses).mean() > 0.9  # nearly every sample has a loss
    assert recorder.hit_ratio > 0.1
    lru_data, lru = _fit(store.root, tmp_path / "lru", cache_fraction=0.3, policy="lru")
    assert recorder.hit_ratio > 2 * lru.hit_ratio


def test_the_cache_reads_through_the_s3_test_server(s3, tmp_path):
    x, y = skewed_workload(100, 8, 0.2, seed=0)
    SampleStore.write("s3://viper-bucket/samples", zip(x, y), s3.storage_options)
    data, recorder = _fit("s3://viper-bucket/samples", tmp_path, cache_fraction=0.3, num_workers=2,
                          storage_options=s3.storage_options)
    assert recorder.total_draws == 3 * 100 and recorder.hit_ratio > 0.1


def test_ddp_ranks_cache_their_own_and_share_the_scores(store, tmp_path):
    """Two real DDP ranks: each draws its own samples into its own cache, and each ranks every
    sample either drew (the callback gathers the losses of both)."""
    import json
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "tests._ddp_sample_cache", "--root", store.root, "--out", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0]["cache_dir"] != ranks[1]["cache_dir"]
    assert set(ranks[0]["drawn"]) != set(ranks[1]["drawn"])  # each rank its own draws
    union = set(ranks[0]["drawn"]) | set(ranks[1]["drawn"])
    for rank in ranks:
        assert set(rank["scored"]) == union  # a loss for every sample either rank trained on
        assert rank["draws"] == 2 * (len(store) // 2 // 20) * 20


def test_the_example_yaml_configures_the_cache_from_lightningcli(store, tmp_path):
    config = yaml.safe_load((REPO / "examples/sample_cache/train.yaml").read_text())
    config["trainer"].update(max_epochs=1, default_root_dir=str(tmp_path / "run"))
    config["trainer"]["callbacks"] = config["trainer"]["callbacks"][:1]  # the publisher is tested elsewhere
    config["data"].update(root=store.root, num_workers=0, cache_dir=str(tmp_path / "cache"))
    config["model"]["dim"] = 8
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    from examples.sample_cache.train import main

    cli = main(["fit", "--config", str(path)])
    data = cli.trainer.datamodule
    assert isinstance(data, ImportanceDataModule) and data.policy == "importance" and data.cache_fraction == 0.2
    assert isinstance(cli.trainer.callbacks[0], SampleLossCallback) and cli.trainer.callbacks[0].total_draws > 0
