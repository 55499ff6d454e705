"""ViperCallback: publishes a LightningModule's weights on a schedule while it trains."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from .._errors import ConfigurationError, ViperError
from .._priority import BACKGROUND_NICENESS
from ..schedules import EveryNSteps, PublishSchedule
from ._device import MAX_COPIES
from ._probes import ServedLossProbe
from ._publisher import ModelPublisher
from ._sharded import ShardedPublisher, any_rank, highest_on_any_rank
from ._settings import DEFAULT_ENDPOINT, DEFAULT_FETCH_ENDPOINT, PublisherSettings
from ._switcher import DEFAULT_TOGETHER_DEADLINE_S

__all__ = ["ViperCallback"]

log = logging.getLogger("viper_lightning.callback")

_PUBLISHED, _SKIPPED, _FAILED = 0, 1, 2  # a rank's publish, as agreed across the ranks of a sharded run


class ViperCallback(Callback):
    """Publish the model to Viper consumers on `schedule` (and once more when training ends).

    Who publishes depends on how the weights are spread over the ranks:
    - replicas (one process, DDP): global rank 0 publishes the whole model;
    - sharded (ModelParallelStrategy: FSDP2 and tensor parallelism, whose weights are DTensors):
      every rank publishes the pieces it holds, with no all-gather, through a ShardedPublisher
      (part i of n is the model `<model_name>.part<i>of<n>`; rank r's notices go to `endpoint`'s
      port + r), and consumers follow it with a ShardedSubscriber. The ranks agree on each
      publish decision (one small all-reduce per step), so they number versions alike.
    FSDPStrategy (FSDP1) is refused: its state_dict gathers the whole model with collectives.

    The callback's state (last version and step, the schedule's state) is saved in Lightning
    checkpoints, so a resumed run continues the version numbers.

    Args:
        model_name: name consumers subscribe to (also the directory under `pfs_root`).
        endpoint: ZeroMQ endpoint the notices are published on (loopback by default).
        pfs_root: file-system tier: a directory or fsspec URL for durable versions (None:
            memory only, nothing survives the run).
        schedule: when to publish; defaults to `EveryNSteps(100)`.
        dram_versions: versions kept in shared memory for consumers (0 turns the tier off).
        dram_bytes: a byte budget for those versions (None: none); the newest always stays.
        gpu_device: the GPU tier: "auto" keeps a device copy of the latest version when the
            module trains on CUDA (publishing then waits for no copy: it runs on a side stream),
            "cuda:N" names the device, None turns the tier off.
        collective_endpoint: serve versions to other hosts over torch.distributed, e.g.
            "nccl://0.0.0.0:0" (the GPU tier) or "gloo://0.0.0.0:0" (host memory); trusted
            networks only, its store is not authenticated. None: off.
        fetch_endpoint: where remote consumers fetch versions from memory (None: nowhere).
        hmac_key: shared key signing notices and manifests (16+ bytes).
        hmac_key_file: file holding the key instead, to keep it out of configs and logs.
        keep_versions: versions kept on the file system; None keeps all.
        heartbeat_interval: seconds between repeats of the latest notice.
        publish_on_train_end: publish the final weights when training ends.
        on_tier_error: "degrade" (default): a failed write to the file-system tier is reported
            (the log, `publisher.health`, and `viper/degraded_tiers` on the Trainer's logger)
            while training goes on and the tier retries; "raise" stops training with it.
        allow_keyless: without a key, sign nothing and serve anyone (an explicit, logged opt-out);
            by default a key is created for the model on this host (see ModelPublisher).
        keep_every_version: write every version to the file system; by default a version a
            newer one replaced before its write started is skipped (the last is always written).
        background_niceness: how far below training's CPU priority the publisher's file-system
            writer runs (Linux nice values, 0 to 19; default 0; see ModelPublisher for what it
            does and what it measured).
        skip_unchanged_frozen: copy (and digest) a frozen parameter (requires_grad=False) only
            when torch saw it change; off by default (see ModelPublisher for why).
        together: replicas subscribed with `together=True` swap to each version at once, on a
            signed switch sent when they are ready (see ModelPublisher).
        together_quorum: ready replicas that suffice for a switch (None: those of the last one).
        together_deadline: seconds after which replicas not ready are left out of a switch.
    """

    def __init__(
        self,
        model_name: str,
        endpoint: str = DEFAULT_ENDPOINT,
        pfs_root: str | None = None,
        schedule: PublishSchedule | None = None,
        dram_versions: int = 1,
        dram_bytes: int | None = None,
        gpu_device: str | None = "auto",
        collective_endpoint: str | None = None,
        fetch_endpoint: str | None = DEFAULT_FETCH_ENDPOINT,
        hmac_key: str | None = None,
        hmac_key_file: str | None = None,
        keep_versions: int | None = None,
        heartbeat_interval: float = 1.0,
        publish_on_train_end: bool = True,
        on_tier_error: str = "degrade",
        allow_keyless: bool = False,
        keep_every_version: bool = False,
        background_niceness: int = BACKGROUND_NICENESS,
        skip_unchanged_frozen: bool = False,
        together: bool = False,
        together_quorum: int | None = None,
        together_deadline: float = DEFAULT_TOGETHER_DEADLINE_S,
    ) -> None:
        key = _read_key(hmac_key, hmac_key_file)
        # Checked here, when the callback is built (not at train start); "auto" is resolved then.
        self.settings = PublisherSettings(
            model_name, endpoint, pfs_root, key, dram_versions=dram_versions, dram_bytes=dram_bytes,
            gpu_device=None if gpu_device == "auto" else gpu_device, fetch_endpoint=fetch_endpoint,
            collective_endpoint=collective_endpoint, keep_versions=keep_versions,
            heartbeat_interval=heartbeat_interval, on_tier_error=on_tier_error, allow_keyless=allow_keyless,
            keep_every_version=keep_every_version, background_niceness=background_niceness,
            skip_unchanged_frozen=skip_unchanged_frozen, together=together, together_quorum=together_quorum,
            together_deadline=together_deadline)
        self._auto_gpu = gpu_device == "auto"
        self.schedule = schedule if schedule is not None else EveryNSteps(100)
        if not isinstance(self.schedule, PublishSchedule):
            raise ConfigurationError(f"schedule must be a viper_lightning.schedules.PublishSchedule, "
                                     f"got {type(self.schedule).__name__}")
        self.publish_on_train_end = publish_on_train_end
        self.last_version = 0
        self.last_step = -1
        self.last_stall_s: float | None = None  # training-thread seconds the last publish cost (the hook)
        self._publisher: ModelPublisher | ShardedPublisher | None = None
        self._sharded = False  # every rank publishes its pieces (and agrees on each decision)
        self._reported_commit: int | None = None
        self._degraded_logged: int | None = None
        self._skipped_logged: int | None = None
        self._retry_skipped = False  # the last publish was skipped: try again at the next step
        self.probe = ServedLossProbe()  # used only when the schedule asks for served-loss probes

    @property
    def model_name(self) -> str:
        return self.settings.model_name

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(model_name=self.model_name)

    @property
    def publisher(self) -> ModelPublisher | ShardedPublisher | None:
        """The live publisher during fit (on global rank 0, or on every rank of a sharded model),
        else None."""
        return self._publisher

    # -- Lightning hooks ---------------------------------------------------------------------
    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Every strategy has restored the checkpoint by now (some only after on_fit_start),
        # so a resumed run continues its version numbers.
        if self._publisher is not None:
            return
        self._sharded = _is_sharded(trainer, pl_module)
        if not (self._sharded or trainer.is_global_zero):
            return
        self._degraded_logged = self._skipped_logged = None
        self._retry_skipped = False
        self.probe.reset()
        settings = dataclasses.replace(self.settings, gpu_device=self._gpu_device_for(pl_module),
                                       resume_after=self.last_version)
        if self._sharded:
            self._publisher = ShardedPublisher(**{f.name: getattr(settings, f.name)
                                                  for f in dataclasses.fields(settings)})
        else:
            if trainer.world_size > 1:
                log.info("%s: the %d ranks hold replicas of the weights; global rank 0 publishes them",
                         self.model_name, trainer.world_size)
            self._publisher = ModelPublisher.from_settings(settings)
        self._publisher.prepare(pl_module)  # the first publish then copies into warm memory

    def _gpu_device_for(self, pl_module: L.LightningModule) -> str | None:
        device = str(pl_module.device) if self._auto_gpu and pl_module.device.type == "cuda" \
            else self.settings.gpu_device
        if device is not None and device != "cpu":
            megabytes = sum(t.numel() * t.element_size() for t in pl_module.state_dict().values()) / 1e6
            log.info("GPU tier on %s: up to %d copies of the weights (%.0f MB each) stay on that device; "
                     "gpu_device=None turns it off", device, MAX_COPIES, megabytes)
        return device

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if self._publisher is None or step == self.last_step:
            return  # gradient accumulation: several batches share one optimizer step
        for report in self._publisher.take_consumer_reports():
            self.schedule.observe_load_time(report.latency_s)
        loss = _loss_of(outputs) if self.schedule.needs_loss else None  # may wait for the device: not a publish cost
        started = time.perf_counter()  # the schedule's decision is training time lost too
        # a publish skipped for lack of a warm slot is retried at the next step (coalesced)
        decided = self.schedule.should_publish(step, loss) or self._retry_skipped
        if self._sharded and not self.schedule.decides_by_step:  # a pending retry is agreed already
            decided = any_rank(decided)  # every rank publishes its part of the same version
        if decided:
            self._publish(trainer, pl_module, loss, started)
            self._log_publisher_state(pl_module)
        if self.schedule.probes and not self._sharded:  # a probe's forward would need every rank's collectives
            self._probe(step, pl_module, batch, batch_idx)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._publisher is None or trainer.global_step == self.last_step:
            return
        started = time.perf_counter()
        decided = self.schedule.should_publish_at_epoch_end(trainer.current_epoch, trainer.global_step)
        if self._sharded and not self.schedule.decides_by_step:
            decided = any_rank(decided)
        if decided:
            self._publish(trainer, pl_module, None, started)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._publisher is None:
            return
        if self.publish_on_train_end and trainer.global_step != self.last_step:
            self._publish(trainer, pl_module, None, time.perf_counter(), wait_for_slot=True)
        self._publisher.flush()

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        publisher, self._publisher = self._publisher, None
        if publisher is not None:
            publisher.close()  # raises a background failure here rather than losing it

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule,
                     exception: BaseException) -> None:
        publisher, self._publisher = self._publisher, None
        if publisher is not None:
            try:
                publisher.close()
            except ViperError:
                log.exception("the Viper publisher also failed while training was failing")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"last_version": self.last_version, "last_step": self.last_step,
                "schedule": self.schedule.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_version = int(state_dict.get("last_version", 0))
        self.last_step = int(state_dict.get("last_step", -1))
        self.schedule.load_state_dict(state_dict.get("schedule", {}))

    # -- internals ---------------------------------------------------------------------------
    def _publish(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: float | None,
                 started: float, wait_for_slot: bool = False) -> None:
        """Publish, and charge the schedule what the training thread really lost: the whole hook
        from `started` (its decision, the snapshot, the hand-off), not the snapshot alone."""
        step = trainer.global_step
        if self._sharded:
            version = self._publish_part(pl_module, step, trainer.current_epoch, wait_for_slot)
        else:
            version = self._publisher.publish(pl_module, step=step, epoch=trainer.current_epoch,
                                              wait_for_slot=wait_for_slot)
        self._retry_skipped = version is None
        if version is None:
            return  # no warm slot: skipped rather than stall training (the publisher counts it)
        self.last_version = version
        self.last_step = step
        if self.schedule.probes:
            self.probe.remember(step, pl_module)
        self.last_stall_s = time.perf_counter() - started
        self.schedule.published(step, loss, self.last_stall_s)
        self._report_commit()
        log.debug("queued %s v%d at step %d (stall %.2f ms)", self.model_name, self.last_version,
                  step, (self.last_stall_s or 0.0) * 1e3)

    def _publish_part(self, pl_module: L.LightningModule, step: int, epoch: int, wait_for_slot: bool) -> int | None:
        """This rank's part; every rank learns whether all published (else all retry next step)
        or one failed (then all raise: none waits in a collective for a rank that stopped)."""
        try:
            version = self._publisher.publish(pl_module, step=step, epoch=epoch, wait_for_slot=wait_for_slot)
        except Exception:
            highest_on_any_rank(_FAILED)
            raise
        outcome = highest_on_any_rank(_SKIPPED if version is None else _PUBLISHED)
        if outcome == _FAILED:
            raise ViperError(f"{self.model_name}: another rank failed to publish its part of the version at step "
                             f"{step}; its log says why")
        return None if outcome == _SKIPPED else version  # a version some rank skipped is incomplete

    def _log_publisher_state(self, pl_module: L.LightningModule) -> None:
        """Log how many tiers are degraded and how many publishes were skipped, when that
        changes (and at the first publish): a Lightning `log` call costs about as much as a
        small model's whole snapshot, and a logger keeps the last value anyway."""
        degraded = sum(state.startswith("degraded") for state in self._publisher.health.values())
        if degraded != self._degraded_logged:
            self._degraded_logged = degraded
            pl_module.log("viper/degraded_tiers", float(degraded), on_step=True, on_epoch=False)
        skipped = self._publisher.publishes_skipped
        if skipped != self._skipped_logged:
            self._skipped_logged = skipped
            pl_module.log("viper/publishes_skipped", float(skipped), on_step=True, on_epoch=False)

    def _probe(self, step: int, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        """Score the versions the schedule asks about on this step's batch. It runs on the
        training thread, so its time is part of the step time the schedule measures."""
        for version_step in self.schedule.probe_versions(step):
            if version_step >= step:  # that version has trained on this very batch: not a served loss
                continue
            scored = self.probe.loss(version_step, pl_module, batch, batch_idx)
            if scored is not None:
                self.schedule.observe_served_loss(*scored)

    def _report_commit(self) -> None:
        """Tell the schedule how long the newest completed background write took, once."""
        commit = self._publisher.last_commit
        if commit is not None and commit.version != self._reported_commit and commit.store_s > 0:
            self._reported_commit = commit.version
            self.schedule.observe_commit_time(commit.digest_s + commit.store_s)


def _is_sharded(trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
    """Whether the ranks hold pieces of the weights (DTensors) rather than replicas."""
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.tensor import DTensor

    if isinstance(trainer.strategy, FSDPStrategy):
        raise ConfigurationError(
            "ViperCallback does not publish from FSDPStrategy (FSDP1): its state_dict gathers the whole model onto "
            "every rank with collectives. Train with ModelParallelStrategy (FSDP2, see configure_model): each rank "
            "then publishes its own shard")
    return any(isinstance(tensor, DTensor) for tensor in pl_module.state_dict().values())


def _read_key(hmac_key: str | None, hmac_key_file: str | None) -> str | bytes | None:
    if hmac_key is not None and hmac_key_file is not None:
        raise ConfigurationError("give hmac_key or hmac_key_file, not both")
    if hmac_key_file is None:
        return hmac_key
    try:
        return Path(hmac_key_file).read_bytes().strip()
    except OSError as exc:
        raise ConfigurationError(f"hmac_key_file {hmac_key_file!r} cannot be read: {exc.strerror}") from None


def _loss_of(outputs: Any) -> float | None:
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
    if isinstance(loss, torch.Tensor) and loss.numel() == 1:
        return float(loss.detach())
    return None
