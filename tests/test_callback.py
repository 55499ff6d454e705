"""ViperCallback inside real Lightning Trainers, with a consumer in another process."""

from __future__ import annotations

import multiprocessing
import time

import lightning as L
import pytest
import safetensors.torch

from viper_lightning import ConfigurationError, FileSystemTier, ViperCallback
from viper_lightning.schedules import EveryEpoch, EveryNSteps

from ._consumer_process import follow
from .conftest import LOOPBACK_ANY_PORT, assert_same_weights
from .lightning_models import Regressor

WAIT_S = 120


def make_trainer(tmp_path, callback: ViperCallback, **kwargs) -> L.Trainer:
    options = dict(max_steps=300, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=str(tmp_path))
    options.update(kwargs)
    return L.Trainer(callbacks=[callback], **options)


def test_trainer_publishes_and_a_consumer_process_ends_bit_exact(tmp_path, pfs_root) -> None:
    callback = ViperCallback("regressor", LOOPBACK_ANY_PORT, pfs_root, schedule=EveryNSteps(25),
                             heartbeat_interval=0.2)
    module = Regressor()
    trainer = make_trainer(tmp_path, callback, enable_checkpointing=False)
    context = multiprocessing.get_context("spawn")
    inbox, outbox = context.Queue(), context.Queue()
    out_path = str(tmp_path / "served.safetensors")

    class StartConsumerOnTrainStart(L.Callback):
        """The endpoint is bound in on_train_start; start the consumer right after."""

        def on_train_start(self, trainer, pl_module):
            self.process = context.Process(target=follow, args=(
                Regressor, "regressor", callback.publisher.endpoint, pfs_root, out_path, inbox, outbox))
            self.process.start()
            assert outbox.get(timeout=WAIT_S) == "ready"

    starter = StartConsumerOnTrainStart()
    trainer.callbacks.append(starter)
    try:
        trainer.fit(module)
        inbox.put(callback.last_version)
        report = outbox.get(timeout=WAIT_S)
    finally:
        starter.process.join(WAIT_S)
        if starter.process.is_alive():
            starter.process.kill()
    assert callback.last_version == 12  # steps 25..300 every 25
    assert report["reached"] and report["version"] == 12 and report["refused"] == 0
    assert report["applied"] >= 2  # it followed the run, not only the last version
    assert_same_weights(module.state_dict(), safetensors.torch.load_file(out_path))
    assert FileSystemTier(pfs_root).latest("regressor") == 12


def test_every_epoch_publishes_once_per_epoch_and_at_the_end(tmp_path, pfs_root) -> None:
    callback = ViperCallback("regressor", LOOPBACK_ANY_PORT, pfs_root, schedule=EveryEpoch(),
                             keep_every_version=True)
    trainer = make_trainer(tmp_path, callback, max_steps=-1, max_epochs=3, enable_checkpointing=False)
    trainer.fit(Regressor())
    tier = FileSystemTier(pfs_root)
    assert tier.versions("regressor") == [1, 2, 3]  # the end of training adds nothing new
    steps = [tier.read_manifest("regressor", v, None).step for v in (1, 2, 3)]
    assert steps == [80, 160, 240]


def test_resumed_run_continues_version_numbers(tmp_path) -> None:
    first_root, second_root = str(tmp_path / "pfs1"), str(tmp_path / "pfs2")
    first = ViperCallback("regressor", LOOPBACK_ANY_PORT, first_root, schedule=EveryNSteps(50),
                          keep_every_version=True)
    trainer = make_trainer(tmp_path, first, max_steps=100)
    trainer.fit(Regressor())
    checkpoint = trainer.checkpoint_callback.best_model_path or trainer.checkpoint_callback.last_model_path
    assert first.last_version == 2
    # A fresh storage root, so only the checkpoint can tell the new run where versions stand.
    second = ViperCallback("regressor", LOOPBACK_ANY_PORT, second_root, schedule=EveryNSteps(50),
                           keep_every_version=True)
    resumed = make_trainer(tmp_path, second, max_steps=200)
    resumed.fit(Regressor(), ckpt_path=checkpoint)
    assert FileSystemTier(second_root).versions("regressor") == [3, 4]
    assert second.last_version == 4


def test_publisher_failure_surfaces_in_training(tmp_path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the model directory should go")
    callback = ViperCallback("regressor", LOOPBACK_ANY_PORT, str(blocker), schedule=EveryNSteps(10),
                             on_tier_error="raise")
    trainer = make_trainer(tmp_path, callback, max_steps=60, enable_checkpointing=False)
    with pytest.raises(Exception, match=r"while writing version \d+ of 'regressor'"):
        trainer.fit(Regressor())


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(model_name="bad name!", pfs_root="/tmp/x"), "model_name 'bad name!' is not valid"),
    (dict(model_name="m", dram_versions=0), "no tier would hold the published bytes"),
    (dict(model_name="m", keep_versions=0), "keep at least 1 version"),
    (dict(model_name="m", heartbeat_interval=-1.0), "positive number of seconds"),
    (dict(model_name="m", fetch_endpoint="localhost"), "is not a ZeroMQ endpoint"),
    (dict(model_name="m", pfs_root="/tmp/x", hmac_key="short"), "at least 16"),
    (dict(model_name="m", pfs_root="/tmp/x", hmac_key="k" * 16, hmac_key_file="/k"), "not both"),
    (dict(model_name="m", pfs_root="/tmp/x", hmac_key_file="/nonexistent/key"), "cannot be read"),
    (dict(model_name="m", pfs_root="/tmp/x", schedule="often"), "PublishSchedule"),
])
def test_configuration_errors_raise_at_construction(kwargs, match) -> None:
    with pytest.raises(ConfigurationError, match=match):
        ViperCallback(**kwargs)


def test_schedule_arguments_are_checked() -> None:
    with pytest.raises(ConfigurationError, match="n must be a positive integer"):
        EveryNSteps(0)


def test_endpoint_in_use_is_a_configuration_error(tmp_path, pfs_root) -> None:
    from viper_lightning import ModelPublisher
    with ModelPublisher("a", LOOPBACK_ANY_PORT, pfs_root) as first:
        with pytest.raises(ConfigurationError, match="cannot bind notice endpoint"):
            ModelPublisher("b", first.endpoint, pfs_root)


@pytest.mark.parametrize("endpoint", ["127.0.0.1:5555", "tcp://127.0.0.1", "http://x:1", "tcp://host:port"])
def test_malformed_endpoints_are_refused_by_every_entry_point(endpoint, pfs_root) -> None:
    from viper_lightning import ModelPublisher, ModelSubscriber
    from .lightning_models import Regressor as Model
    for build in (lambda: ViperCallback("m", endpoint, pfs_root),
                  lambda: ModelPublisher("m", endpoint, pfs_root),
                  lambda: ModelSubscriber(Model(), "m", endpoint)):
        with pytest.raises(ConfigurationError, match="is not a ZeroMQ endpoint"):
            build()


def test_only_global_rank_zero_publishes(tmp_path, pfs_root) -> None:
    callback = ViperCallback("regressor", LOOPBACK_ANY_PORT, pfs_root, schedule=EveryNSteps(10),
                             keep_every_version=True)
    trainer = make_trainer(tmp_path, callback, max_steps=30, strategy="ddp_spawn", devices=2,
                           enable_checkpointing=False)
    trainer.fit(Regressor())
    tier = FileSystemTier(pfs_root)
    # Two publishing ranks would have written every version twice (and collided on v1).
    assert tier.versions("regressor") == [1, 2, 3]
    producers = {tier.read_manifest("regressor", v, None).producer for v in (1, 2, 3)}
    assert len(producers) == 1


def test_gpu_tier_through_the_callback_reaches_the_file_system(tmp_path, pfs_root) -> None:
    """gpu_device="cpu": the GPU tier's cascade (device copy, host copy, file system) driven by a
    real Trainer; on a CUDA module "auto" picks the module's device instead."""
    callback = ViperCallback("regressor", LOOPBACK_ANY_PORT, pfs_root, schedule=EveryNSteps(100),
                             gpu_device="cpu", collective_endpoint="gloo://127.0.0.1:0")
    module = Regressor()
    make_trainer(tmp_path, callback, enable_checkpointing=False).fit(module)
    assert callback.last_version == 3
    stored = safetensors.torch.load_file(f"{pfs_root}/regressor/v3/model.safetensors")
    assert_same_weights(module.state_dict(), stored)


def test_gpu_device_setting_is_checked_when_the_callback_is_built() -> None:
    with pytest.raises(ConfigurationError, match="gpu_device='gpu0'"):
        ViperCallback("regressor", gpu_device="gpu0")
    with pytest.raises(ConfigurationError, match="collective address"):
        ViperCallback("regressor", collective_endpoint="tcp://127.0.0.1:1")


class RecordingSchedule(EveryNSteps):
    """EveryNSteps that keeps the writer times the callback reports."""

    def __init__(self, every_n_steps: int) -> None:
        super().__init__(every_n_steps)
        self.commit_times: list[float] = []

    def observe_commit_time(self, seconds: float) -> None:
        self.commit_times.append(seconds)


def test_schedule_learns_the_background_writer_time(tmp_path, pfs_root) -> None:
    schedule = RecordingSchedule(20)
    callback = ViperCallback("regressor", LOOPBACK_ANY_PORT, pfs_root, schedule=schedule, keep_every_version=True)
    make_trainer(tmp_path, callback, max_steps=200, enable_checkpointing=False).fit(Regressor())
    assert callback.last_version == 10
    assert schedule.commit_times and all(seconds > 0 for seconds in schedule.commit_times)
    assert len(schedule.commit_times) <= 10  # each completed write reported once


def test_a_failing_file_system_tier_never_stops_training(tmp_path) -> None:
    """Issue 11, defect 10: the default policy. A file where the model directory should go makes
    every write fail; training finishes every step and the logger hears of the degraded tier."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the model directory should go")
    callback = ViperCallback("regressor", LOOPBACK_ANY_PORT, str(blocker), schedule=EveryNSteps(10))
    trainer = make_trainer(tmp_path, callback, max_steps=60, enable_checkpointing=False)
    trainer.fit(Regressor())
    assert trainer.global_step == 60 and callback.last_version == 6
    assert trainer.callback_metrics["viper/degraded_tiers"] == 1


class SlowToDecide(EveryNSteps):
    """A schedule whose decision costs the training thread DECIDE_S each step."""

    DECIDE_S = 0.02

    def __init__(self) -> None:
        super().__init__(10)
        self.charged: list[float] = []

    def should_publish(self, step: int, loss: float | None = None) -> bool:
        time.sleep(self.DECIDE_S)  # the cost being measured, not a synchronisation
        return super().should_publish(step, loss)

    def published(self, step: int, loss: float | None, stall_s: float) -> None:
        self.charged.append(stall_s)


def test_the_schedule_is_charged_what_the_training_thread_lost(tmp_path) -> None:
    """Issue 12, item 1: the schedule learnt the snapshot time alone (the publisher's stall), not
    the time the hook took from training: its own decision, the hand-off, the logging."""
    schedule = SlowToDecide()
    callback = ViperCallback("regressor", LOOPBACK_ANY_PORT, schedule=schedule, allow_keyless=True)
    publisher_stalls = []

    class Watch(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if callback.last_step == trainer.global_step:
                publisher_stalls.append(callback.publisher.last_stall_s)

    trainer = make_trainer(tmp_path, callback, max_steps=30, enable_checkpointing=False)
    trainer.callbacks.append(Watch())
    trainer.fit(Regressor())
    assert len(schedule.charged) == 3 and len(publisher_stalls) == 3
    assert all(charged >= SlowToDecide.DECIDE_S for charged in schedule.charged)
    assert all(charged > stall for charged, stall in zip(schedule.charged, publisher_stalls))
    assert callback.last_stall_s == schedule.charged[-1]


def test_a_skipped_publish_is_retried_at_the_next_step(tmp_path) -> None:
    """Transfers that never end hold every slot the pool may grow to: the callback's publish is
    skipped (training goes on, the count is logged), and once a slot is free again it publishes
    at the very next step, one the schedule did not ask for."""

    class HoldEveryVersion(L.Callback):  # after ViperCallback: borrows what it just published
        def __init__(self, viper: ViperCallback) -> None:
            self.viper, self.held, self.published_steps = viper, [], []

        def on_train_batch_end(self, trainer, *args) -> None:
            publisher = self.viper.publisher
            if self.viper.last_step == trainer.global_step:
                self.published_steps.append(trainer.global_step)
                if publisher.publishes_skipped == 0:
                    self.held.append(publisher._store.borrow(self.viper.last_version))
            if publisher.publishes_skipped == 1 and self.held:
                for held in self.held:
                    publisher._store.give_back(held)
                self.held.clear()

    viper = ViperCallback("retry", LOOPBACK_ANY_PORT, schedule=EveryNSteps(2), fetch_endpoint=None)
    holder = HoldEveryVersion(viper)
    trainer = L.Trainer(max_steps=60, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[viper, holder])
    trainer.fit(Regressor())
    odd = [step for step in holder.published_steps if step % 2 and step != 60]
    assert len(odd) == 1, holder.published_steps  # the retry, the step after the skip
    assert odd[0] - 1 not in holder.published_steps  # the step whose publish was skipped
    assert trainer.callback_metrics["viper/publishes_skipped"] == 1
