"""Multi-fidelity training on real EMNIST images: trustworthy low-fidelity scores, rungs, control, checkpoints."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from emnist_hpo.config import ConvBlock, ExperimentConfig, ModelConfig, TrainConfig
from emnist_hpo.train import trainer as training
from emnist_hpo.train.fidelity import Ladder, Rung, make_ladder
from emnist_hpo.train.trainer import RungControl, TrialCheckpoint, train


@pytest.fixture(scope="module")
def balanced(prepared_sample):
    """6,000 real balanced images (4,800 train / 1,200 validation, 47 classes)."""
    return prepared_sample("balanced", 6000)


def _bn_cfg(epochs: int = 2, momentum: float = 0.9) -> ExperimentConfig:
    model = ModelConfig(conv_blocks=[ConvBlock(16, 3), ConvBlock(32, 3)], batch_norm=True, bn_momentum=momentum,
                        dense=[64])
    return ExperimentConfig(model=model, train=TrainConfig(epochs=epochs, batch_size=128)).validate()


def test_a_batch_norm_model_is_scored_on_its_weights_not_on_stale_statistics(balanced, monkeypatch):
    """Two epochs on 4,800 images (~76 steps): with Keras' momentum 0.99 and no recomputed statistics the
    validation score says chance; recomputed, it says what the weights have learnt."""
    d = balanced
    fixed = train(_bn_cfg(), d.x_train, d.y_train, d.x_val, d.y_val, d.num_classes)
    monkeypatch.setattr(training, "PRECISE_BN_IMAGES", 0)  # the project before: momentum 0.99, stale statistics
    stale = train(_bn_cfg(momentum=0.99), d.x_train, d.y_train, d.x_val, d.y_val, d.num_classes)
    learnt = fixed.history["accuracy"][-1]  # what the weights do on the batches they trained on
    assert stale.best_val_accuracy < learnt / 3, (stale.history, learnt)
    assert fixed.best_val_accuracy > 0.8 * learnt and fixed.best_val_accuracy > 2.5 * stale.best_val_accuracy, \
        (fixed.history, stale.history)
    # training itself was the same: only what validation saw differs
    assert abs(fixed.history["accuracy"][-1] - stale.history["accuracy"][-1]) < 0.1


def test_rungs_grow_nested_shares_and_report_each_score(balanced):
    d = balanced
    ladder = Ladder((Rung(0.25, 1, 1), Rung(0.5, 1, 3), Rung(1.0, 2, 9, final=True)), 3, "data")
    seen = []

    class Record(RungControl):
        def before(self, index, rung, images):
            seen.append(("before", index, images))

        def after(self, result, final):
            seen.append(("after", result.index, result.images, final))

    cfg = ExperimentConfig(model=ModelConfig(conv_blocks=[ConvBlock(8, 3)], dense=[]),
                           train=TrainConfig(epochs=2, batch_size=128)).validate()
    r = train(cfg, d.x_train, d.y_train, d.x_val, d.y_val, d.num_classes, ladder=ladder, control=Record())
    n = len(d.y_train)
    sizes = ladder.sizes(n)
    assert sizes == [n // 4, n // 2, n]
    assert seen == [("before", 0, sizes[0]), ("after", 0, sizes[0], False), ("before", 1, sizes[1]),
                    ("after", 1, sizes[1], False), ("before", 2, 2 * n), ("after", 2, 2 * n, True)]
    assert [x.index for x in r.rungs] == [0, 1, 2] and r.images_seen == sizes[0] + sizes[1] + 2 * n
    assert r.history["rung"] == [0, 1, 2, 2] and r.epochs_run == 4
    # screening rungs are scored once, at their end; the last rung every epoch
    assert [np.isfinite(v) for v in r.history["val_accuracy"]] == [True, True, True, True]
    assert r.rungs[-1].score == r.best_val_accuracy and r.best_epoch in (1, 2)
    assert r.completed


def test_a_control_stops_a_trial_before_or_after_a_rung(balanced):
    d = balanced
    ladder = make_ladder("epochs", 3, len(d.y_train), d.num_classes)  # rungs end after 1 and 3 epochs
    cfg = ExperimentConfig(model=ModelConfig(conv_blocks=[ConvBlock(8, 3)], dense=[]),
                           train=TrainConfig(epochs=3, batch_size=128)).validate()

    class PruneFirst(RungControl):
        def after(self, result, final):
            return "pruned at rung 0"

    r = train(cfg, d.x_train, d.y_train, d.x_val, d.y_val, d.num_classes, ladder=ladder, control=PruneFirst())
    assert r.stopped_reason == "stopped" and r.stop_detail == "pruned at rung 0" and r.epochs_run == 1
    assert not r.completed

    class NoTime(RungControl):
        def before(self, index, rung, images):
            return "time budget" if index == 1 else None

    r = train(cfg, d.x_train, d.y_train, d.x_val, d.y_val, d.num_classes, ladder=ladder, control=NoTime())
    assert r.stop_detail == "time budget" and [x.index for x in r.rungs] == [0]


class _StopAfter(keras.callbacks.Callback):
    def __init__(self, epochs: int):
        super().__init__()
        self.epochs = epochs

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.epochs:
            raise KeyboardInterrupt


def test_an_interrupted_run_continues_from_its_last_epoch(balanced, tmp_path):
    d = balanced
    ladder = Ladder((Rung(0.5, 1, 1), Rung(1.0, 3, 3, final=True)), 3, "data")
    cfg = _bn_cfg(epochs=3)
    ckpt = TrialCheckpoint(tmp_path / "running_0.npz")
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C after the second epoch: the first of the last rung
        train(cfg, d.x_train, d.y_train, d.x_val, d.y_val, d.num_classes, ladder=ladder, checkpoint=ckpt,
              callbacks=[_StopAfter(2)])
    assert ckpt.exists()
    weights, opt, position = ckpt.load()
    assert (position["rung"], position["epoch"]) == (1, 1) and len(position["history"]["loss"]) == 2
    assert len(position["rungs"]) == 1 and opt  # rung 0's result, and the optimizer's state
    resumed = train(cfg, d.x_train, d.y_train, d.x_val, d.y_val, d.num_classes, ladder=ladder, checkpoint=ckpt)
    assert resumed.epochs_run == 4 and resumed.history["loss"][:2] == position["history"]["loss"]
    assert [x.index for x in resumed.rungs] == [0, 1] and resumed.best_val_accuracy > 0.3
    # the optimizer went on where it stopped (its step count), it did not start again
    steps = np.ceil(len(d.y_train) * 0.5 / 128) + 3 * np.ceil(len(d.y_train) / 128)
    assert int(keras.ops.convert_to_numpy(resumed.model.optimizer.iterations)) == steps


def test_a_checkpoint_of_another_architecture_is_ignored(balanced, tmp_path):
    d = balanced
    ckpt = TrialCheckpoint(tmp_path / "running_0.npz")
    other = ExperimentConfig(model=ModelConfig(conv_blocks=[ConvBlock(4, 3)], dense=[]),
                             train=TrainConfig(epochs=1)).validate()
    with pytest.raises(KeyboardInterrupt):
        train(other, d.x_train, d.y_train, d.x_val, d.y_val, d.num_classes, checkpoint=ckpt, callbacks=[_StopAfter(1)])
    r = train(_bn_cfg(epochs=1), d.x_train, d.y_train, d.x_val, d.y_val, d.num_classes, checkpoint=ckpt)
    assert r.epochs_run == 1  # started afresh: the saved weights do not fit this model


def test_the_final_fit_trains_the_whole_last_rung_not_the_epoch_the_trial_peaked_at(balanced):
    """A trial whose validation peaked at epoch 1 of 3 is still fitted for all 3 epochs of the last rung on
    train+validation: the schedule it was judged on (balanced sample: 84.8% fitted to its peak, 86.8% in full)."""
    from emnist_hpo.search.finalize import Champion, final_model

    d = balanced
    ladder = Ladder((Rung(0.5, 1, 1), Rung(1.0, 3, 9, final=True)), 3, "data")
    cfg = ExperimentConfig(model=ModelConfig(conv_blocks=[ConvBlock(8, 3)], dense=[]),
                           train=TrainConfig(epochs=3, batch_size=128)).validate()
    _, _, fit = final_model(Champion(0, cfg, 0.5, "optuna"), d, ladder, True, log=lambda m: None)
    assert fit.history["rung"] == [0, 1, 1, 1] and fit.epochs_run == 4
    assert fit.images_seen == ladder.sizes(len(d.y_train) + len(d.y_val))[0] + 3 * (len(d.y_train) + len(d.y_val))


def test_a_plateau_champions_final_fit_replays_the_learning_rates_its_trial_ran_at(balanced):
    """A final fit has no validation for ReduceLROnPlateau to watch: it replays, epoch by epoch, the rates the trial
    trained its last rung at (recorded by global epoch, as the trial attribute the study keeps), instead of holding
    the first rate (byclass: a champion whose trial had halved its rate three times, fitted at the constant rate)."""
    from emnist_hpo.search.finalize import Champion, final_model
    from emnist_hpo.search.trial import RATES_ATTR, rates_of

    d = balanced
    ladder = Ladder((Rung(0.5, 1, 1), Rung(1.0, 3, 9, final=True)), 3, "data")
    cfg = ExperimentConfig(model=ModelConfig(conv_blocks=[ConvBlock(8, 3)], dense=[]),
                           train=TrainConfig(epochs=3, batch_size=128, schedule="plateau")).validate()
    trial = train(cfg, d.x_train, d.y_train, d.x_val, d.y_val, d.num_classes, ladder=ladder)
    assert sorted(trial.last_rung_rates) == [1, 2, 3]  # the last rung's epochs, numbered across the ladder
    assert trial.last_rung_rates[1] == pytest.approx(cfg.train.learning_rate)

    reduced = {1: 1e-3, 2: 5e-4, 3: 2.5e-4}  # what a trial whose validation loss stalled would have recorded
    attrs = {RATES_ATTR: [[epoch, rate] for epoch, rate in reduced.items()]}  # JSON, as Optuna stores it
    _, fitted, fit = final_model(Champion(0, cfg, 0.5, "optuna", rates=rates_of(attrs)), d, ladder, True,
                                 log=lambda m: None)
    assert fit.history["rung"] == [0, 1, 1, 1]
    assert fit.history["learning_rate"] == pytest.approx([1e-3, 1e-3, 5e-4, 2.5e-4], rel=1e-4)
    _, _, held = final_model(Champion(0, cfg, 0.5, "optuna"), d, ladder, True, log=lambda m: None)
    assert held.history["learning_rate"] == pytest.approx([1e-3] * 4, rel=1e-4)  # nothing recorded: held
    assert cfg.train.schedule == "plateau" and fitted.train.schedule == "constant"  # the trial's config untouched


class _Weights(keras.callbacks.Callback):
    """Each rung's weights where its fit begins, and the raw weights and their moving average at each epoch's end."""

    def __init__(self):
        super().__init__()
        self.begins, self.raw, self.averaged = [], [], []

    def on_train_begin(self, logs=None):
        self.begins.append(self.model.get_weights())

    def on_epoch_end(self, epoch, logs=None):
        self.raw.append(self.model.get_weights())
        with training.averaged_weights(self.model):
            self.averaged.append(self.model.get_weights())


def _same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b))


def test_averaged_weights_are_what_validation_scores_and_what_training_ends_on(balanced):
    """With ``train.average_epochs`` the optimizer keeps a moving average of the weights: each validation scores
    the average (batch-norm statistics recomputed for it), the run ends on that very model, and a rung that is not
    the last hands its raw weights to the next (as a run that never stopped between rungs would)."""
    d = balanced
    ladder = Ladder((Rung(0.5, 1, 1), Rung(1.0, 2, 3, final=True)), 3, "data")
    cfg = _bn_cfg(epochs=2)
    cfg.train.average_epochs = 0.5
    seen = _Weights()
    r = train(cfg, d.x_train, d.y_train, d.x_val, d.y_val, d.num_classes, ladder=ladder, callbacks=[seen])
    first = np.ceil(len(d.y_train) * 0.5 / 128)  # the first rung's steps: the average spans at most an eighth of them
    assert r.model.optimizer.use_ema and r.model.optimizer.ema_momentum == pytest.approx(1 - 1 / (first / 8))

    delivered = r.model.get_weights()
    assert _same(delivered, seen.averaged[-1]) and not _same(delivered, seen.raw[-1])
    scores = r.model.evaluate(d.x_val, d.y_val, batch_size=1024, verbose=0, return_dict=True)
    assert scores["accuracy"] == pytest.approx(r.val_score, abs=1e-6) and r.val_score > 0.3  # scored = delivered
    # rung 1 began from rung 0's raw weights, not from the average fit ended on
    assert _same(seen.begins[1], seen.raw[0]) and not _same(seen.begins[1], seen.averaged[0])


def test_averaging_is_off_by_default_where_early_stopping_restores_one_epochs_weights_and_short_on_a_short_first_rung():
    from emnist_hpo.train.schedules import averaging_momentum

    assert averaging_momentum(TrainConfig(), 100) is None
    assert averaging_momentum(TrainConfig(average_epochs=0.5), 100) == pytest.approx(1 - 1 / 50)
    assert averaging_momentum(TrainConfig(average_epochs=0.5, early_stopping_patience=3), 100) is None
    # never longer than an eighth of the first rung: a short first rung is scored on its own late weights
    assert averaging_momentum(TrainConfig(average_epochs=0.5), 100, first_rung_steps=160) == pytest.approx(1 - 1 / 20)
    assert averaging_momentum(TrainConfig(average_epochs=0.5), 100, first_rung_steps=4000) == pytest.approx(1 - 1 / 50)
