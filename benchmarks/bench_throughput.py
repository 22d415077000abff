"""Training throughput: the trial trainer against a plain Keras fit of the same model, same process.

The reference is the research's recipe: float32 arrays divided by 255, ``model.fit``,
Adam, batch 128. Every variant of the trainer (``emnist_hpo.train.trainer.train`` with a
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

if "--tf-defaults" in sys.argv:  # a child for the research's process: TensorFlow starts before emnist_hpo sets anything
    import tensorflow  # noqa: F401

from _common import DEFAULT_DATA, PYTHON, ROOT, fmt, load_now, log, machine, median, table, write_results  # noqa: E402

from emnist_hpo.cli import import_keras_quietly  # noqa: E402

import_keras_quietly()

import keras  # noqa: E402
import numpy as np  # noqa: E402

from emnist_hpo.config import ConvBlock, DataConfig, ExperimentConfig, ModelConfig, TrainConfig, load_experiment  # noqa: E402
from emnist_hpo.data.prepared import prepare  # noqa: E402
from emnist_hpo.model.build import build_model  # noqa: E402
from emnist_hpo.train.trainer import compile_model, dtype_policy, native_bf16, resolve_precision, train  # noqa: E402

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


def measure(quick: bool, data_dir: str, reps: int | None = None, all_variants: bool = False) -> dict[str, Any]:
    samples = 5000 if quick else 30000
    reps = reps or (2 if quick else 3)
    data = prepare("bymerge", data_dir, DataConfig(max_train_samples=samples, seed=0), progress=False)
    n = len(data.x_train)
    variants = [v for v in VARIANTS if not (quick and v.full_only)]
    skipped: list[str] = []
    if not native_bf16() and not all_variants:  # emulated bf16: 0.12x on the 2-conv model on an AVX2 CPU
        skipped = [v.name for v in variants if v.train.get("precision") == "mixed_bfloat16"]
        variants = [v for v in variants if v.name not in skipped]
        log(f"no bf16 units on this CPU: skipping {', '.join(skipped)} (--all-variants runs them)")
    out: dict[str, Any] = {"samples_train": n, "samples_val": len(data.x_val), "reps": reps, "models": {},
                           "epochs": {k: EPOCHS[k][1 if quick else 0] for k in EPOCHS}, "skipped": skipped}
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


#: Process-wide settings, fixed when TensorFlow starts, so each runs in child processes: (name, TF defaults?).
#: "TensorFlow defaults" is the research's process (oneDNN only where TensorFlow turns it on by itself: CPUs
#: with AVX512-VNNI or newer); "emnist-hpo" is a process that imported emnist_hpo first (oneDNN on, x86-64).
PROCESSES = [("TensorFlow defaults (the research's process)", True), ("emnist-hpo process (oneDNN on)", False)]


def child(args) -> None:
    """Child process: time the reference and/or the default trainer on one model, print one JSON line."""
    import tensorflow as tf

    from emnist_hpo.train.trainer import onednn_enabled

    if args.intra:
        tf.config.threading.set_intra_op_parallelism_threads(args.intra)
    if args.inter:
        tf.config.threading.set_inter_op_parallelism_threads(args.inter)
    data = prepare("bymerge", args.data_dir, DataConfig(max_train_samples=args.samples, seed=0), progress=False)
    m = models()[args.model]
    base = load_experiment(ROOT / "experiments" / "two_conv.yaml").train if args.model == "two_conv" else TrainConfig()
    n, out = len(data.x_train), {"onednn": onednn_enabled(), "samples_train": len(data.x_train)}
    for what in args.what.split(","):
        if what == "reference":
            clock, acc = run_reference(m, data, args.epochs, 0)
        else:
            clock, acc, _, _ = run_trainer(m, base, Variant("defaults"), data, args.epochs, 0)
        out[what] = {"images_per_s": n / median(clock.train_s[1:] or clock.train_s),
                     "images_per_cpu_s": n / median(clock.cpu_s[1:] or clock.cpu_s), "val_accuracy": acc}
    print(json.dumps(out))


def spawn(model: str, data_dir: str, samples: int, epochs: int, what: str, tf_defaults: bool,
          intra: int = 0, inter: int = 0) -> dict[str, Any] | None:
    env = dict(__import__("os").environ, TF_CPP_MIN_LOG_LEVEL="2")
    if tf_defaults:
        env.pop("TF_ENABLE_ONEDNN_OPTS", None)  # as TensorFlow decides by itself
    cmd = [PYTHON, __file__, "--child", "--model", model, "--data-dir", data_dir, "--samples", str(samples),
           "--epochs", str(epochs), "--what", what, "--intra", str(intra), "--inter", str(inter)]
    proc = subprocess.run(cmd + (["--tf-defaults"] if tf_defaults else []), capture_output=True, text=True, env=env)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not line:
        log(f"child failed ({' '.join(cmd[2:])}): {proc.stderr[-800:]}")
        return None
    return json.loads(line[-1])


def measure_processes(data_dir: str, reps: int) -> dict[str, Any]:
    """The trainer in an emnist-hpo process against the research's fit in a TensorFlow-defaults process.

    Children interleave (research, emnist-hpo, research, ...); each ratio divides figures of the
    same repetition. The emnist-hpo child also times the reference in its own process, which
    splits the gain into the process setting (oneDNN) and the trainer's own choices.
    """
    samples = 12000  # quick too: steady epochs of a few seconds, or the noise of a shared machine decides
    out: dict[str, Any] = {"samples": samples, "reps": reps, "models": {}}
    for mname in models():
        epochs = EPOCHS[mname][0]
        runs: list[tuple[dict, dict]] = []
        for rep in range(reps):
            research = spawn(mname, data_dir, samples, epochs, "reference", tf_defaults=True)
            ours = spawn(mname, data_dir, samples, epochs,
                         "reference,trainer" if rep % 2 == 0 else "trainer,reference", tf_defaults=False)
            if research and ours:
                runs.append((research, ours))
                log(f"processes {mname} rep {rep}: research fit {research['reference']['images_per_s']:.0f} img/s "
                    f"(oneDNN {research['onednn']}), emnist-hpo: reference {ours['reference']['images_per_s']:.0f}, "
                    f"trainer {ours['trainer']['images_per_s']:.0f} img/s (oneDNN {ours['onednn']})")
        if not runs:
            continue

        def ratios(num, den, key="images_per_s"):
            return [num(o, r)[key] / den(o, r)[key] for r, o in runs]

        def row(name, pick, onednn):
            rs = [pick(o, r) for r, o in runs]
            got = ratios(pick, lambda o, r: r["reference"])
            return {"what": name, "onednn": onednn, "images_per_s_median": median(x["images_per_s"] for x in rs),
                    "ratio_median": median(got), "ratio_min": min(got), "ratio_max": max(got),
                    "cpu_ratio_median": median(ratios(pick, lambda o, r: r["reference"], "images_per_cpu_s")),
                    "val_accuracy_median": median(x["val_accuracy"] for x in rs)}

        r0, o0 = runs[0]
        out["models"][mname] = {"epochs": epochs, "samples_train": o0["samples_train"], "rows": [
            row("Keras fit, float32 /255 (reference), " + PROCESSES[0][0], lambda o, r: r["reference"], r0["onednn"]),
            row("Keras fit, float32 /255 (reference), " + PROCESSES[1][0], lambda o, r: o["reference"], o0["onednn"]),
            row("trial trainer (TrainConfig defaults), " + PROCESSES[1][0], lambda o, r: o["trainer"], o0["onednn"]),
        ]}
    return out


def measure_threads(data_dir: str, reps: int = 2, samples: int = 12000) -> list[dict[str, Any]]:
    """TensorFlow thread-pool settings, each in its own emnist-hpo process (they are fixed at TF start), interleaved."""
    cores = __import__("os").cpu_count() or 1
    settings = [(f"TF default (intra = inter = {cores} cores)", 0, 0), (f"intra {cores}, inter 1", cores, 1),
                ("intra 1, inter 1", 1, 1), (f"intra 1, inter {cores}", 1, cores)]
    got: dict[tuple, list[dict]] = {(m, s[0]): [] for m in models() for s in settings}
    for rep in range(reps):
        for (model, name), (_, intra, inter) in zip(got, [s for _ in models() for s in settings]):
            r = spawn(model, data_dir, samples, EPOCHS[model][0], "reference,trainer", False, intra, inter)
            if r is None:
                continue
            r = {"reference": r["reference"]["images_per_s"], "trainer": r["trainer"]["images_per_s"]}
            got[(model, name)].append(r)
            log(f"threads {model} {name} rep {rep}: trainer {r['trainer']:.0f} img/s, reference {r['reference']:.0f}")
    return [{"model": k[0], "setting": k[1], "trainer_images_per_s": median(r["trainer"] for r in v),
             "reference_images_per_s": median(r["reference"] for r in v),
             "ratio": median(r["trainer"] / r["reference"] for r in v)} for k, v in got.items() if v]


def markdown(res: dict[str, Any]) -> str:
    epochs = ", ".join(f"{k} {v}" for k, v in res["epochs"].items()) if isinstance(res["epochs"], dict) else res["epochs"]
    in_process = (f"Training throughput, bymerge sample: {res['samples_train']:,} training images, "
                  f"{res['samples_val']:,} validation, epochs per run: {epochs}; {res['reps']} interleaved "
                  "repetitions; ratio = images/s over the Keras reference's in the same repetition (median, min-max), "
                  "CPU ratio = the same in images per CPU-second.")
    parts = [in_process]
    if res.get("processes", {}).get("models"):
        pr = res["processes"]
        parts = [f"**The target: the trial trainer against the research's fit, each in its own kind of process** "
                 f"(bymerge sample, {pr['samples']:,} images; {pr['reps']} interleaved repetitions of child processes; "
                 "ratio = images/s over the research's fit in the TensorFlow-defaults process of the same "
                 "repetition, median and min-max; CPU ratio = the same in images per CPU-second)\n"]
        for mname, got in pr["models"].items():
            parts.append(f"\n*{mname}* ({got['samples_train']:,} training images, {got['epochs']} epochs per run)\n")
            parts.append(table(
                ["run", "oneDNN", "images/s (median)", "x research's fit (min-max)", "x research's fit, CPU time",
                 "val accuracy"],
                [[r["what"], "on" if r["onednn"] else "off", r["images_per_s_median"],
                  f"{fmt(r['ratio_median'])} ({fmt(r['ratio_min'])}-{fmt(r['ratio_max'])})", r["cpu_ratio_median"],
                  f"{r['val_accuracy_median']:.4f}"] for r in got["rows"]]))
        parts.append("\n**Every speed option alone, in one process** (the emnist-hpo process settings for all). "
                     + in_process)
    for mname, rows in res["models"].items():
        parts.append(f"\n**{mname}**\n")
        parts.append(table(
            ["variant", "images/s (median)", "x reference (min-max)", "x reference, CPU time", "first epoch s",
             "val accuracy"],
            [[r["variant"], r["images_per_s_median"], f"{fmt(r['ratio_median'])} ({fmt(r['ratio_min'])}-"
              f"{fmt(r['ratio_max'])})", r["cpu_ratio_median"], r["first_epoch_s_median"],
              f"{r['val_accuracy_median']:.4f}"] for r in rows]))
    if res.get("skipped"):
        parts.append(f"\nNot run (no bf16 units on this CPU, bf16 is emulated; `--all-variants` runs them): "
                     f"{'; '.join(res['skipped'])}.")
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
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tf-defaults", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--what", default="reference,trainer", help=argparse.SUPPRESS)
    p.add_argument("--epochs", type=int, default=3, help=argparse.SUPPRESS)
    p.add_argument("--all-variants", action="store_true",
                   help="also the mixed_bfloat16 variants on a CPU without bf16 units (emulated: very slow)")
    p.add_argument("--no-processes", action="store_true",
                   help="skip the child-process comparison with the research's TensorFlow-defaults process")
    p.add_argument("--intra", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--inter", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--samples", type=int, default=12000, help=argparse.SUPPRESS)
    p.add_argument("--model", default="two_conv", help=argparse.SUPPRESS)
    p.add_argument("--threads-only", action="store_true", help="only the thread-pool comparison")
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return {}
    res = {"machine": machine(), "default_precision": resolve_precision(TrainConfig().precision)}
    if args.threads_only:
        res["threads"] = measure_threads(args.data_dir)
        md = markdown({**res, "models": {}, "samples_train": 0, "samples_val": 0, "epochs": 0, "reps": 0})
        write_results("threads", res, md)
        print(md)
        return res
    if not args.no_processes:
        res["processes"] = measure_processes(args.data_dir, args.reps or (2 if args.quick else 3))
    res.update(measure(args.quick, args.data_dir, args.reps, args.all_variants))
    if args.threads:
        res["threads"] = measure_threads(args.data_dir)
    res["machine"]["load_average_end"] = list(__import__("os").getloadavg())
    md = markdown(res)
    write_results("throughput", res, md)
    print(md)
    return res


if __name__ == "__main__":
    main()
