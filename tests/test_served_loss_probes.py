"""The callback answers a schedule's served-loss probes in real runs (issue 12, item 1): the
loss of an older published version on the batch this step trained on, measured on a copy of
the module so training itself is untouched."""

from __future__ import annotations

import lightning as L
import torch

from viper_lightning import ViperCallback
from viper_lightning.producer._probes import ServedLossProbe
from viper_lightning.schedules import EveryNSteps, Fixed

from .conftest import LOOPBACK_ANY_PORT
from .lightning_models import Regressor

KEY = "a key for the probe tests, 32 by"


class Probing(EveryNSteps):
    """Publishes every 2 steps and, every 4 steps, asks for the version published 2 steps ago."""

    def __init__(self) -> None:
        super().__init__(2)
        self.asked_at = 0
        self.served: list[tuple[int, int, float]] = []  # (step asked at, version step, loss)

    @property
    def probes(self) -> bool:
        return True

    def probe_versions(self, step: int) -> list[int]:
        self.asked_at = step
        return [step - 2] if step % 4 == 0 else []

    def observe_served_loss(self, version_step: int, loss: float) -> None:
        self.served.append((self.asked_at, version_step, loss))


class Recorder(L.Callback):
    """The weights after each step and each step's batch, to score the probes independently."""

    def __init__(self) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.batches: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        self.weights[step] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self.batches[step] = tuple(t.clone() for t in batch)


def run(schedule, tmp_path, model_name, steps: int = 20) -> tuple[ViperCallback, Recorder, Regressor]:
    callback = ViperCallback(model_name, LOOPBACK_ANY_PORT, schedule=schedule, hmac_key=KEY,
                             fetch_endpoint=LOOPBACK_ANY_PORT)
    recorder, module = Recorder(), Regressor()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                        callbacks=[callback, recorder])
    trainer.fit(module)
    return callback, recorder, module


def test_a_probe_is_the_real_loss_of_that_version_on_this_steps_batch(tmp_path, model_name) -> None:
    schedule = Probing()
    callback, recorder, module = run(schedule, tmp_path, model_name)
    assert [(asked, version) for asked, version, _ in schedule.served] == [(4, 2), (8, 6), (12, 10), (16, 14),
                                                                          (20, 18)]
    scorer = Regressor()
    for asked, version, loss in schedule.served:
        scorer.load_state_dict(recorder.weights[version])
        x, y = recorder.batches[asked]
        with torch.no_grad():
            expected = float(torch.nn.functional.mse_loss(scorer.net(x), y))
        assert loss == expected
        # the version really is older than what trained on that batch (else the test proves nothing)
        assert not torch.equal(recorder.weights[version]["net.0.weight"], recorder.weights[asked]["net.0.weight"])
    assert int(module.seen) == 20, "probes ran the training module's own step"
    assert callback.probe.probes == 5 and callback.probe.seconds > 0


def test_the_kept_copies_are_bounded_and_spread_over_ages() -> None:
    """Publishing every step for 300 steps keeps a handful of copies, the newest and some old
    enough for every probe age; a probe of an evicted version scores the kept one before it."""
    probe, module = ServedLossProbe(), Regressor()
    for step in range(1, 301):
        with torch.no_grad():
            module.net[0].bias.fill_(step)  # each version tells which step it is
        probe.remember(step, module)
        assert len(probe.kept) <= ServedLossProbe.MAX_COPIES
    ages = [300 - step for step in probe.kept]
    assert ages[-1] == 0 and max(ages) <= 160
    for wanted in (5, 10, 20, 40, 80):
        assert any(age >= wanted for age in ages), f"nothing old enough for a {wanted}-step probe: ages {ages}"
    evicted = next(step for step in range(200, 300) if step not in probe.kept)
    version, _ = probe.loss(evicted, module, (torch.randn(4, 8), torch.randn(4, 1)), 0)
    assert version == max(step for step in probe.kept if step <= evicted)
    assert probe.loss(probe.kept[0] - 1, module, (torch.randn(4, 8), torch.randn(4, 1)), 0) is None


def test_an_adaptive_schedule_gets_every_probe_it_asks_for_in_a_real_run(tmp_path, model_name) -> None:
    schedule = Fixed(request_rate=100.0, total_requests=10_000, warmup_steps=10, fallback_interval=2, probe_every=2)
    callback, _, _ = run(schedule, tmp_path, model_name, steps=40)
    assert callback.probe.probes > 0
    assert len(schedule._losses.served) == callback.probe.probes


class NeedsItsTrainer(Regressor):
    """A training_step that reads the trainer, as many do: a detached copy cannot run it."""

    def training_step(self, batch, batch_idx):
        self.trainer.global_step  # noqa: B018 (raises without a trainer)
        return super().training_step(batch, batch_idx)


def test_a_probe_that_fails_turns_probing_off_and_training_goes_on(tmp_path, model_name, caplog) -> None:
    schedule = Probing()
    callback = ViperCallback(model_name, LOOPBACK_ANY_PORT, schedule=schedule, hmac_key=KEY,
                             fetch_endpoint=LOOPBACK_ANY_PORT)
    trainer = L.Trainer(max_steps=20, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                        callbacks=[callback])
    trainer.fit(NeedsItsTrainer())
    assert trainer.global_step == 20 and callback.last_version == 10
    assert schedule.served == [] and "training_step failed" in (callback.probe.disabled or "")
    assert "served-loss probes are off" in caplog.text
