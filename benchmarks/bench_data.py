"""Data: load time of each split (first parse and cached), peak memory of a bymerge study, full-bymerge estimate.

- Load time: ``load_split`` of every split of the sample with an empty parse cache (gzip
  IDX parsing) and again from the cache, in this process.
- Peak memory: the resident-set high-water mark (``ru_maxrss``) of child processes: the
  study command's imports alone, then a whole study (trials, finalist re-evaluation on
  folds, final fit on train+validation, test evaluation) on the bymerge sample, with a
  fixed tiny model so the figure is about data, not about a large network.
- Full bymerge (697,932 training images): estimated as the sample's peak plus the size of
  the extra uint8 images; with ``--full-size`` measured too, on a synthetic full-size
  split made by repeating the sample's real images (the loader and the study cannot tell).

    python benchmarks/bench_data.py [--quick] [--full-size]
"""

from __future__ import annotations

import argparse
import gzip
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import BYMERGE_FULL, DEFAULT_DATA, PYTHON, log, machine, run_child, table, write_results  # noqa: E402

import numpy as np  # noqa: E402

from emnist_hpo.data.nist import SPLITS, load_split  # noqa: E402

TINY_SPACE = """\
# fixed tiny CNN: the memory benchmark measures data, not a big network
conv_blocks: 1
convs_per_block: 1
filters: 8
kernel: 3
padding: same
pool: max
batch_norm: false
conv_dropout: 0.0
dense_layers: 0
dense_units: 32
dense_dropout: 0.0
batch_size: 512
optimizer: adam
learning_rate: 0.001
schedule: constant
label_smoothing: 0.0
augment: 0.0
"""

IMPORTS = ("from emnist_hpo.cli import import_keras_quietly; import_keras_quietly(); "
           "import emnist_hpo.search.optuna.study, emnist_hpo.tracking.registry, mlflow, optuna")


def load_times(data_dir: str) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for split in SPLITS:
            t = time.perf_counter()
            d = load_split(split, data_dir, cache_dir=cache, progress=False)
            first = time.perf_counter() - t
            t = time.perf_counter()
            load_split(split, data_dir, cache_dir=cache, progress=False)
            cached = time.perf_counter() - t
            mb = (d.x_train.nbytes + d.x_test.nbytes + d.y_train.nbytes + d.y_test.nbytes) / 2**20
            rows.append({"split": split, "train": len(d.x_train), "test": len(d.x_test), "mb": mb,
                         "first_s": first, "cached_s": cached})
            log(f"load {split}: first {first:.2f} s, cached {cached:.3f} s")
    return rows


def study_cmd(root: Path, data_dir: str, name: str, finalists: int) -> list[str]:
    space = root / "tiny.yaml"
    space.write_text(TINY_SPACE)
    return [PYTHON, "-m", "emnist_hpo", "study", "--split", "bymerge", "--trials", "2", "--epochs", "1",
            "--data-dir", data_dir, "--search-space", str(space), "--no-warm-start", "--pruner", "none",
            "--finalists", str(finalists), "--folds", "2", "--no-register", "--no-progress",
            "--storage", f"sqlite:///{root}/optuna.db", "--tracking-uri", f"sqlite:///{root}/mlflow.db",
            "--study-name", name]


def write_full_size(sample_dir: str, out: Path) -> Path:
    """A full-size bymerge in NIST's layout: the sample's real images repeated to 697,932 / 116,323."""
    d = load_split("bymerge", sample_dir, progress=False)
    out.mkdir(parents=True, exist_ok=True)
    for part, x, y, n in (("train", d.x_train, d.y_train, BYMERGE_FULL[0]), ("test", d.x_test, d.y_test,
                                                                              BYMERGE_FULL[1])):
        reps = -(-n // len(x))
        with gzip.open(out / f"emnist-bymerge-{part}-images-idx3-ubyte.gz", "wb", compresslevel=1) as f:
            f.write(struct.pack(">IIII", 0x0803, n, 28, 28))
            written = 0
            for _ in range(reps):
                k = min(len(x), n - written)
                f.write(np.ascontiguousarray(x[:k].transpose(0, 2, 1)).tobytes())  # NIST stores images transposed
                written += k
        labels = np.tile(y, reps)[:n].astype(np.uint8)
        with gzip.open(out / f"emnist-bymerge-{part}-labels-idx1-ubyte.gz", "wb", compresslevel=1) as f:
            f.write(struct.pack(">II", 0x0801, n) + labels.tobytes())
    return out


def measure(quick: bool, data_dir: str, full_size: bool) -> dict[str, Any]:
    res: dict[str, Any] = {"load": load_times(data_dir)}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        env = {"EMNIST_HPO_CACHE": str(root / "cache")}
        r = run_child([PYTHON, "-c", IMPORTS], env=env)
        res["imports_rss_mb"] = r.get("peak_rss_mb")
        log(f"imports only: {res['imports_rss_mb']} MB")
        # the sample, parsed once (the cache), then the study reads the cache as every later run does
        r = run_child([PYTHON, "-c", f"from emnist_hpo.data.nist import load_split; load_split('bymerge', {data_dir!r})"],
                      env=env)
        res["sample_first_parse_rss_mb"] = r.get("peak_rss_mb")
        r = run_child(study_cmd(root, data_dir, "mem-sample", 0 if quick else 1), env=env, cwd=root)
        res["sample_study"] = {k: r.get(k) for k in ("rc", "wall_s", "peak_rss_mb")}
        if r["rc"]:
            res["sample_study"]["tail"] = r["tail"]
        log(f"bymerge sample study: {r.get('peak_rss_mb')} MB in {r['wall_s']} s (rc {r['rc']})")
        d = load_split("bymerge", data_dir, cache_dir=root / "cache", progress=False)
        sample_mb = (d.x_train.nbytes + d.x_test.nbytes) / 2**20
        full_mb = (BYMERGE_FULL[0] + BYMERGE_FULL[1]) * 784 / 2**20
        res["sample_images_mb"], res["full_images_mb"] = sample_mb, full_mb
        if res["sample_study"]["peak_rss_mb"]:
            res["full_estimate_mb"] = res["sample_study"]["peak_rss_mb"] + (full_mb - sample_mb)
        if full_size:
            full_dir = write_full_size(data_dir, root / "full")
            r = run_child([PYTHON, "-c", f"from emnist_hpo.data.nist import load_split; load_split('bymerge', "
                                         f"{str(full_dir)!r})"], env=env)
            res["full_first_parse_rss_mb"] = r.get("peak_rss_mb")
            log(f"full-size first parse: {r.get('peak_rss_mb')} MB")
            r = run_child(study_cmd(root, str(full_dir), "mem-full", 1), env=env, cwd=root)
            res["full_study"] = {k: r.get(k) for k in ("rc", "wall_s", "peak_rss_mb")}
            if r["rc"]:
                res["full_study"]["tail"] = r["tail"]
            log(f"full-size bymerge study: {r.get('peak_rss_mb')} MB in {r['wall_s']} s (rc {r['rc']})")
    return res


def markdown(res: dict[str, Any]) -> str:
    out = ["Load time of each split of the sample (gzip IDX parse into an empty cache, then from the cache):\n"]
    out.append(table(["split", "train", "test", "uint8 arrays MB", "first load s", "cached load s"],
                     [[r["split"], r["train"], r["test"], r["mb"], r["first_s"], f"{r['cached_s']:.3f}"]
                      for r in res["load"]]))
    s = res["sample_study"]
    rows = [["imports of the study command (TensorFlow, Keras, MLflow, Optuna, ...)", res["imports_rss_mb"], "-"],
            ["first parse of the bymerge sample (one-off, then cached)", res["sample_first_parse_rss_mb"], "-"],
            [f"study on the bymerge sample ({res['sample_images_mb']:.0f} MB of uint8 images)", s["peak_rss_mb"],
             s["wall_s"]]]
    if res.get("full_estimate_mb"):
        rows.append([f"full bymerge study, estimated: sample peak + {res['full_images_mb'] - res['sample_images_mb']:.0f}"
                     " MB of extra images", res["full_estimate_mb"], "-"])
    if res.get("full_study"):
        rows.append(["first parse of full-size bymerge (one-off, then cached)", res["full_first_parse_rss_mb"], "-"])
        f = res["full_study"]
        rows.append([f"full-size bymerge study, measured ({res['full_images_mb']:.0f} MB of uint8 images)",
                     f["peak_rss_mb"], f["wall_s"]])
    out.append("\nPeak resident memory (ru_maxrss) of a study process: 2 trials of a fixed tiny CNN, 1 epoch, "
               "finalist re-evaluation on 2 folds, final fit on train+validation, test evaluation:\n")
    out.append(table(["what", "peak RSS MB", "wall s"], rows))
    return "\n".join(out)


def main(argv=None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--full-size", action="store_true", help="also measure a synthetic full-size bymerge (minutes)")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA))
    args = p.parse_args(argv)
    res = {"machine": machine(), **measure(args.quick, args.data_dir, args.full_size)}
    md = markdown(res)
    write_results("data", res, md)
    print(md)
    return res


if __name__ == "__main__":
    main()
