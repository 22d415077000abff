"""Training throughput: the trial trainer against a plain Keras fit of the same model, same process.

The reference is the research's recipe: float32 arrays divided by 255, ``model.fit``,
Adam, batch 128. Every variant of the trainer (``emnist_hpo.training.train`` with a
trial's settings plus one speed option) runs interleaved with it (A B C ... A B C ...)
in one process, so a busy shared machine slows all of them alike; each variant's
figure is the median over repetitions of its images/s divided by the reference's
images/s of the same repetition. Throughput counts training images over the training
part of steady epochs (epoch 1, which traces the graph, is reported apart as start-up).
Accuracy is the validation accuracy after the last epoch, same seed, same data.

    python benchmarks/bench_throughput.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import DEFAULT_DATA, PYTHON, ROOT, fmt, load_now, log, machine, median, table, write_results  # noqa: E402

from emnist_hpo.cli import import_keras_quietly  # noqa: E402

import_keras_quietly()

import keras  # noqa: E402
import numpy as np  # noqa: E402

from emnist_hpo.config import ConvBlock, DataConfig, ExperimentConfig, ModelConfig, TrainConfig, load_experiment  # noqa: E402
from emnist_hpo.dataset import prepare  # noqa: E402
from emnist_hpo.models import build_model  # noqa: E402
from emnist_hpo.training import compile_model, dtype_policy, resolve_precision, train  # noqa: E402

#: The two models measured: the research's 2-conv seed and a small model typical of search_spaces/small.yaml.
def models() -> dict[str, ModelConfig]:
    return {
        "two_conv": load_experiment(ROOT / "experiments" / "two_conv.yaml").model,
        "small": ModelConfig(conv_blocks=[ConvBlock(16, 3)], padding="same", dense=[64]),
    }


#: Epochs per run (full, quick): the small model runs longer so its steady epochs add up to seconds, not noise.
EPOCHS = {"two_conv": (3, 2), "small": (6, 3)}


class EpochClock(keras.callbacks.Callback):
    """Wall and CPU seconds of each epoch's training part (epoch start to validation start)."""

    def __init__(self):
        super().__init__()
        self.train_s: list[float] = []
        self.cpu_s: list[float] = []
        self.epoch_s: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self._t, self._c = time.perf_counter(), time.process_time()
        self._done = False

    def on_test_begin(self, logs=None):
        if not self._done:
            self.train_s.append(time.perf_counter() - self._t)
            self.cpu_s.append(time.process_time() - self._c)
            self._done = True

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_s.append(time.perf_counter() - self._t)


class PerBatchSync(keras.callbacks.Callback):
    """What the trainer's NaN guard did before: read the loss after every batch (a device sync per batch)."""

    def on_train_batch_end(self, batch, logs=None):
        float((logs or {}).get("loss", 0.0))


@dataclass
class Variant:
    name: str
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig overrides; None for the Keras reference
    baseline: bool = False
    extra: Callable[[], list] | None = None  # extra callbacks
    numpy_feed: bool = False  # fit on the NumPy arrays (Keras' array path) instead of the trainer's batches
    full_only: bool = False
    once: bool = False  # measured in the first repetition only (XLA: minutes of compiling, far slower on CPU)
    note: str = ""


VARIANTS = [
    Variant("Keras fit, float32 /255 (reference)", baseline=True),
    Variant("trainer before this change (float32, NumPy fed, per-batch NaN check)", {"precision": "float32"},
            extra=lambda: [PerBatchSync()], numpy_feed=True),
    Variant("float32, NumPy fed", {"precision": "float32"}, numpy_feed=True, full_only=True),
    Variant("float32", {"precision": "float32"}),
    Variant("float32 + XLA (jit_compile)", {"precision": "float32", "jit_compile": True}, full_only=True, once=True),
    Variant("float32 + steps_per_execution 8", {"precision": "float32", "steps_per_execution": 8}, full_only=True),
    Variant("mixed_bfloat16", {"precision": "mixed_bfloat16", "steps_per_execution": 1}),
    Variant("mixed_bfloat16 + XLA", {"precision": "mixed_bfloat16", "jit_compile": True}, full_only=True,
            once=True),
    Variant("mixed_bfloat16 + steps_per_execution 8", {"precision": "mixed_bfloat16", "steps_per_execution": 8},
            full_only=True),
    Variant("mixed_bfloat16 + steps_per_execution 32", {"precision": "mixed_bfloat16", "steps_per_execution": 32}),
    Variant("TrainConfig defaults (the trial trainer)", {}),
    Variant("defaults, batch 256 (a search choice)", {"batch_size": 256}, full_only=True),
    Variant("defaults, batch 512 (a search choice)", {"batch_size": 512}, full_only=True),
]


def reference_model(m: ModelConfig, num_classes: int) -> keras.Model:
    """The same network as the research wrote it: float32 (28, 28, 1) input, no rescaling layer."""
    from keras import layers

    net = [keras.Input((28, 28, 1))]
    for block in m.conv_blocks:
        for _ in range(block.convs):
            net.append(layers.Conv2D(block.filters, block.kernel, padding=m.padding, activation="relu"))
        net.append(layers.MaxPooling2D() if m.pool == "max" else layers.AveragePooling2D())
    net.append(layers.Flatten())
    net += [layers.Dense(w, activation="relu") for w in m.dense]
    net.append(layers.Dense(num_classes, activation="softmax"))
    return keras.Sequential(net)


def run_reference(m: ModelConfig, data, epochs: int, seed: int) -> tuple[EpochClock, float]:
    keras.utils.set_random_seed(seed)
    model = reference_model(m, data.num_classes)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    x = (data.x_train.astype("float32") / 255.0)[..., None]
    xv = (data.x_val.astype("float32") / 255.0)[..., None]
    clock = EpochClock()
    hist = model.fit(x, data.y_train, batch_size=128, epochs=epochs, validation_data=(xv, data.y_val),
                     callbacks=[clock], verbose=0, shuffle=True)
    return clock, float(hist.history["val_accuracy"][-1])


def run_trainer(m: ModelConfig, base_train: TrainConfig, v: Variant, data, epochs: int, seed: int):
    cfg = ExperimentConfig(model=copy.deepcopy(m), train=copy.deepcopy(base_train))
    for k, val in v.train.items():
        setattr(cfg.train, k, val)
    cfg.train.epochs, cfg.train.seed, cfg.train.early_stopping_patience = epochs, seed, 0
    cfg.validate()
    clock = EpochClock()
    if v.numpy_feed:  # the trainer's model and compile settings, fed the way the trainer did before
        keras.utils.set_random_seed(seed)
        precision = resolve_precision(cfg.train.precision)
        with dtype_policy(precision):
            model = build_model(cfg.model, data.num_classes)
        compile_model(model, cfg, data.num_classes, -(-len(data.x_train) // cfg.train.batch_size))
        hist = model.fit(data.x_train, data.y_train, batch_size=cfg.train.batch_size, epochs=epochs,
                         validation_data=(data.x_val, data.y_val), callbacks=[clock, *(v.extra() if v.extra else [])],
                         verbose=0, shuffle=True)
        return clock, float(hist.history["val_accuracy"][-1]), precision, cfg.train
    res = train(cfg, data.x_train, data.y_train, data.x_val, data.y_val, data.num_classes,
                callbacks=[clock, *(v.extra() if v.extra else [])])
    return clock, float(res.history["val_accuracy"][-1]), res.precision, cfg.train


def measure(quick: bool, data_dir: str, reps: int | None = None) -> dict[str, Any]:
    samples = 5000 if quick else 30000
    reps = reps or (2 if quick else 3)
    data = prepare("bymerge", data_dir, DataConfig(max_train_samples=samples, seed=0), progress=False)
    n = len(data.x_train)
    variants = [v for v in VARIANTS if not (quick and v.full_only)]
    out: dict[str, Any] = {"samples_train": n, "samples_val": len(data.x_val), "reps": reps, "models": {},
                           "epochs": {k: EPOCHS[k][1 if quick else 0] for k in EPOCHS}}
    for mname, m in models().items():
        epochs = EPOCHS[mname][1 if quick else 0]
        base_train = TrainConfig()
        if mname == "two_conv":
            base_train = load_experiment(ROOT / "experiments" / "two_conv.yaml").train
        runs: dict[str, list[dict]] = {v.name: [] for v in variants}
        for rep in range(reps):
            for v in variants:
                if v.once and rep > 0:
                    continue
                t0 = time.perf_counter()
                load = load_now()
                if v.baseline:
                    clock, acc = run_reference(m, data, epochs, seed=0)
                    precision, tc = "float32", None
                else:
                    clock, acc, precision, tc = run_trainer(m, base_train, v, data, epochs, seed=0)
                steady = clock.train_s[1:] or clock.train_s
                steady_cpu = clock.cpu_s[1:] or clock.cpu_s
                r = {
                    "images_per_s": n / median(steady),
                    "images_per_cpu_s": n / median(steady_cpu),
                    "first_epoch_s": clock.epoch_s[0],
                    "run_s": time.perf_counter() - t0,
                    "val_accuracy": acc,
                    "precision": precision,
                    "load": load,
                    "settings": None if tc is None else {"precision": tc.precision, "jit_compile": tc.jit_compile,
                                                         "steps_per_execution": tc.steps_per_execution,
                                                         "batch_size": tc.batch_size},
                }
                runs[v.name].append(r)
                log(f"throughput {mname} rep {rep} {v.name}: {r['images_per_s']:.0f} img/s, "
                    f"val {acc:.4f}, load {load}")
        ref = runs[variants[0].name]
        rows = []
        for v in variants:
            rs = runs[v.name]
            ratios = [r["images_per_s"] / b["images_per_s"] for r, b in zip(rs, ref)]  # same repetition
            cpu_ratios = [r["images_per_cpu_s"] / b["images_per_cpu_s"] for r, b in zip(rs, ref)]
            rows.append({
                "variant": v.name,
                "settings": rs[0]["settings"],
                "precision": rs[0]["precision"],
                "images_per_s_median": median(r["images_per_s"] for r in rs),
                "images_per_s_best": max(r["images_per_s"] for r in rs),
                "ratio_median": median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "cpu_ratio_median": median(cpu_ratios),
                "first_epoch_s_median": median(r["first_epoch_s"] for r in rs),
                "val_accuracy_median": median(r["val_accuracy"] for r in rs),
                "val_accuracy_all": [round(r["val_accuracy"], 4) for r in rs],
                "runs": rs,
            })
        out["models"][mname] = rows
    return out


def thread_child(args) -> None:
    """Child process: set TF's thread pools, then time the reference and the default trainer on one model."""
    import tensorflow as tf

    if args.intra:
        tf.config.threading.set_intra_op_parallelism_threads(args.intra)
    if args.inter:
        tf.config.threading.set_inter_op_parallelism_threads(args.inter)
    data = prepare("bymerge", args.data_dir, DataConfig(max_train_samples=args.samples, seed=0), progress=False)
    m = models()[args.model]
    base = load_experiment(ROOT / "experiments" / "two_conv.yaml").train if args.model == "two_conv" else TrainConfig()
    epochs = EPOCHS[args.model][0]
    c_ref, _ = run_reference(m, data, epochs, 0)
    c, acc, _, _ = run_trainer(m, base, Variant("defaults"), data, epochs, 0)
    n = len(data.x_train)
    print(json.dumps({"reference": n / median(c_ref.train_s[1:]), "trainer": n / median(c.train_s[1:]),
                      "val_accuracy": acc}))


def measure_threads(data_dir: str, reps: int = 2, samples: int = 12000) -> list[dict[str, Any]]:
    """TensorFlow thread-pool settings, each in its own process (they are fixed at TF start), interleaved."""
    cores = __import__("os").cpu_count() or 1
    settings = [(f"TF default (intra = inter = {cores} cores)", 0, 0), (f"intra {cores}, inter 1", cores, 1),
                ("intra 1, inter 1", 1, 1), (f"intra 1, inter {cores}", 1, cores)]
    got: dict[tuple, list[dict]] = {(m, s[0]): [] for m in models() for s in settings}
    for rep in range(reps):
        for (model, name), (_, intra, inter) in zip(got, [s for _ in models() for s in settings]):
            cmd = [PYTHON, __file__, "--thread-child", "--intra", str(intra), "--inter", str(inter),
                   "--data-dir", data_dir, "--samples", str(samples), "--model", model]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**__import__("os").environ,
                                                                              "TF_CPP_MIN_LOG_LEVEL": "2"})
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode or not line:
                log(f"thread child failed: {proc.stderr[-800:]}")
                continue
            r = json.loads(line[-1])
            got[(model, name)].append(r)
            log(f"threads {model} {name} rep {rep}: trainer {r['trainer']:.0f} img/s, reference {r['reference']:.0f}")
    return [{"model": k[0], "setting": k[1], "trainer_images_per_s": median(r["trainer"] for r in v),
             "reference_images_per_s": median(r["reference"] for r in v),
             "ratio": median(r["trainer"] / r["reference"] for r in v)} for k, v in got.items() if v]


def markdown(res: dict[str, Any]) -> str:
    epochs = ", ".join(f"{k} {v}" for k, v in res["epochs"].items()) if isinstance(res["epochs"], dict) else res["epochs"]
    parts = [f"Training throughput, bymerge sample: {res['samples_train']:,} training images, "
             f"{res['samples_val']:,} validation, epochs per run: {epochs}; {res['reps']} interleaved "
             "repetitions; ratio = images/s over the Keras reference's in the same repetition (median, min-max), "
             "CPU ratio = the same in images per CPU-second."]
    for mname, rows in res["models"].items():
        parts.append(f"\n**{mname}**\n")
        parts.append(table(
            ["variant", "images/s (median)", "x reference (min-max)", "x reference, CPU time", "first epoch s",
             "val accuracy"],
            [[r["variant"], r["images_per_s_median"], f"{fmt(r['ratio_median'])} ({fmt(r['ratio_min'])}-"
              f"{fmt(r['ratio_max'])})", r["cpu_ratio_median"], r["first_epoch_s_median"],
              f"{r['val_accuracy_median']:.4f}"] for r in rows]))
    if res.get("threads"):
        parts.append("\n**TensorFlow thread pools** (separate processes: pools are fixed when TF starts; medians)\n")
        parts.append(table(["model", "setting", "trainer images/s", "reference images/s", "x reference"],
                           [[t["model"], t["setting"], t["trainer_images_per_s"], t["reference_images_per_s"],
                             t["ratio"]] for t in res["threads"]]))
    return "\n".join(parts)


def main(argv=None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA))
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--threads", action="store_true", help="also compare TF thread-pool settings (slow)")
    p.add_argument("--thread-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--intra", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--inter", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--samples", type=int, default=12000, help=argparse.SUPPRESS)
    p.add_argument("--model", default="two_conv", help=argparse.SUPPRESS)
    p.add_argument("--threads-only", action="store_true", help="only the thread-pool comparison")
    args = p.parse_args(argv)
    if args.thread_child:
        thread_child(args)
        return {}
    res = {"machine": machine(), "default_precision": resolve_precision(TrainConfig().precision)}
    if args.threads_only:
        res["threads"] = measure_threads(args.data_dir)
        md = markdown({**res, "models": {}, "samples_train": 0, "samples_val": 0, "epochs": 0, "reps": 0})
        write_results("threads", res, md)
        print(md)
        return res
    res.update(measure(args.quick, args.data_dir, args.reps))
    if args.threads:
        res["threads"] = measure_threads(args.data_dir)
    res["machine"]["load_average_end"] = list(__import__("os").getloadavg())
    md = markdown(res)
    write_results("throughput", res, md)
    print(md)
    return res


if __name__ == "__main__":
    main()
