"""What batch-norm costs a training epoch, with Keras' own layer and with the fused one the models use.

    python benchmarks/bench_batch_norm.py                 # compact on 6,000 letters images, 3 epochs, 2 rounds
    python benchmarks/bench_batch_norm.py --images 12000 --rounds 3
    python benchmarks/bench_batch_norm.py --filters 24,40,24    # compact's shape, other channel counts

Trains the compact seed (experiments/compact.yaml: 6 conv layers, each followed by batch-norm) through the
project's own ``train`` three ways, in turns: with :class:`keras.layers.BatchNormalization` (Keras 3 writes it
in backend ops: a dozen element-wise kernels per layer under TensorFlow), with
:class:`~emnist_hpo.model.batch_norm.FastBatchNormalization` (TensorFlow's fused kernel), and without
batch-norm (the same model otherwise); ``--filters`` gives its three blocks other channel counts (under bf16 the
fused kernel is fast only for a multiple of 16 channels, and the layer takes Keras' path for the others). Prints seconds per epoch (the first epoch, which traces the graph,
left out) and each variant's validation accuracy, which must agree between the two batch-norm layers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import DEFAULT_DATA, log, machine, table, write_results  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", default="letters")
    ap.add_argument("--images", type=int, default=6000, help="training images (20%% more are held for validation)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2, help="turns of the three variants (the machine is noisy)")
    ap.add_argument("--filters", default=None,
                    help="channels of compact's three blocks, e.g. 24,40,24 (default: compact's own 32,48,64)")
    ap.add_argument("--data-dir", default=str(DEFAULT_DATA))
    ap.add_argument("--name", default="batch-norm")
    args = ap.parse_args(argv)

    from emnist_hpo.cli import import_keras_quietly
    import_keras_quietly()
    import dataclasses

    import keras

    from emnist_hpo.config import DataConfig, load_experiment
    from emnist_hpo.data.prepared import prepare
    from emnist_hpo.model import build
    from emnist_hpo.model.batch_norm import FastBatchNormalization
    from emnist_hpo.paths import find_experiment
    from emnist_hpo.train.trainer import train

    data = prepare(args.split, args.data_dir, DataConfig(max_train_samples=int(args.images / 0.8)), progress=False)
    cfg = load_experiment(find_experiment("compact"))
    cfg.train.epochs, cfg.train.early_stopping_patience = args.epochs, 0
    if args.filters:
        widths = [int(f) for f in args.filters.split(",")]
        if len(widths) != len(cfg.model.conv_blocks):
            ap.error(f"--filters needs {len(cfg.model.conv_blocks)} channel counts, one per block (got {args.filters!r})")
        cfg.model.conv_blocks = [dataclasses.replace(b, filters=w) for b, w in zip(cfg.model.conv_blocks, widths)]
    no_bn = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, batch_norm=False))
    variants = {"keras BatchNormalization": (cfg, keras.layers.BatchNormalization),
                "fused (FastBatchNormalization)": (cfg, FastBatchNormalization),
                "no batch-norm": (no_bn, FastBatchNormalization)}
    times: dict[str, list[float]] = {k: [] for k in variants}
    accs: dict[str, list[float]] = {k: [] for k in variants}
    try:
        for r in range(args.rounds):
            for name, (c, layer) in variants.items():
                build.BATCH_NORM = layer
                t0 = time.perf_counter()
                res = train(c, data.x_train, data.y_train, data.x_val, data.y_val, data.num_classes)
                wall = time.perf_counter() - t0
                per_epoch = statistics.median(res.epoch_times[1:] or res.epoch_times)
                times[name].append(per_epoch)
                accs[name].append(res.best_val_accuracy)
                log(f"round {r + 1}: {name}: {per_epoch:.2f} s/epoch ({wall:.1f} s in all), "
                    f"val {res.best_val_accuracy:.4f}")
    finally:
        build.BATCH_NORM = FastBatchNormalization
    ref = statistics.median(times["keras BatchNormalization"])
    rows = [[k, f"{statistics.median(v):.2f}", f"{len(data.y_train) / statistics.median(v):.0f}",
             f"{statistics.median(v) / ref:.2f}", " ".join(f"{a:.4f}" for a in accs[k])] for k, v in times.items()]
    md = table(["variant", "s per epoch", "images per s", "time vs Keras' layer", "validation accuracy per round"],
               rows)
    print(md)
    write_results(args.name, {"machine": machine(), "args": vars(args),
                              "seconds_per_epoch": times, "val_accuracy": accs}, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
