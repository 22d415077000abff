"""``predict`` on real-world-like images: real EMNIST test characters rendered as photos and scans.

The champion is a real (quick) digits study's; the images are real test images of the
sample, drawn large, off-centre, dark ink on (tinted) paper or the reverse, saved as
RGB JPEG, palette PNG, grey PNG and RGBA PNG with a transparent background.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from emnist_hpo.cli import main
from emnist_hpo.data.nist import load_split
from emnist_hpo.data.images import ImageError, prepare_file, to_emnist
from emnist_hpo.tracking.registry import load_champion

VARIANTS = ("jpeg", "palette", "inverse", "alpha")


def render(x28: np.ndarray, variant: str, path: Path, rng: np.random.Generator, size=(300, 400)) -> tuple[Path, tuple]:
    """Draw an upright EMNIST image (white on black) as a large photo-like file; return it and where the ink went."""
    side = int(rng.integers(150, 250))
    ink = Image.fromarray(255 - x28).resize((side, side), Image.Resampling.BICUBIC)  # dark ink on white
    canvas = Image.new("L", size, 255)
    at = (int(rng.integers(0, size[0] - side)), int(rng.integers(0, size[1] - side)))
    canvas.paste(ink, at)
    if variant == "jpeg":  # blue pen on cream paper, lossy
        path = path.with_suffix(".jpg")
        ImageOps.colorize(canvas, black=(25, 30, 90), white=(240, 232, 210)).save(path, quality=85)
    elif variant == "palette":
        path = path.with_suffix(".png")
        canvas.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(path)
    elif variant == "inverse":  # chalk on a blackboard
        path = path.with_suffix(".png")
        ImageOps.invert(canvas).save(path)
    else:  # black ink on a transparent sheet
        path = path.with_suffix(".png")
        alpha = ImageOps.invert(canvas)
        Image.merge("RGBA", (Image.new("L", size, 0),) * 3 + (alpha,)).save(path)
    return path, (at[0], at[1], at[0] + side, at[1] + side)


@pytest.fixture(scope="module")
def digits(sample_dir):
    return load_split("digits", sample_dir, progress=False)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory, digits):
    """32 real test digits, 8 per variant: (paths, labels, original images)."""
    root = tmp_path_factory.mktemp("rendered")
    rng = np.random.default_rng(7)
    idx = rng.choice(len(digits.x_test), 32, replace=False)
    paths = [render(digits.x_test[i], VARIANTS[k % 4], root / f"char_{k}", rng)[0] for k, i in enumerate(idx)]
    return paths, digits.y_test[idx], digits.x_test[idx]


def test_predict_recovers_rendered_characters(digits_champion, rendered, digits, capsys):
    paths, y, originals = rendered
    rc = main(["predict", "--split", "digits", "--tracking-uri", digits_champion["tracking"], "--json",
               *map(str, paths)])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert [o["image"] for o in out] == [str(p) for p in paths]
    for o in out:
        probs = [t["prob"] for t in o["top"]]
        assert len(o["top"]) == 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 1.0 + 1e-6
        assert all(t["char"] in digits.classes for t in o["top"])
    predicted = np.array([digits.classes.index(o["top"][0]["char"]) for o in out])
    # the same model on the original 28x28 images: what the rendering and the preprocessing may cost
    model = load_champion(digits_champion["tracking"], "digits")
    reference = np.asarray(model.predict(originals)).argmax(axis=1)
    acc, ref_acc = float((predicted == y).mean()), float((reference == y).mean())
    agree = float((predicted == reference).mean())
    print(f"rendered accuracy {acc:.3f}, original accuracy {ref_acc:.3f}, agreement {agree:.3f}")
    assert acc >= 0.75 and acc >= ref_acc - 0.15
    assert agree >= 0.8
    for v in range(4):  # every kind of file works, not just most of them overall
        assert (predicted[v::4] == y[v::4]).mean() >= 0.5, VARIANTS[v]


def test_text_output_lists_top_characters(digits_champion, rendered, capsys):
    paths = [str(p) for p in rendered[0][:2]]
    assert main(["predict", "--split", "digits", "--tracking-uri", digits_champion["tracking"], *paths]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert [line.split(":")[0] for line in lines] == paths
    assert all(len(line.split(": ", 1)[1].split()) == 6 for line in lines)  # three (char, prob) pairs
    version = digits_champion["result"].registered.version
    assert f"answered by emnist-digits v{version} (@champion)" in err  # which model said it
    assert main(["predict", "--split", "digits", "--tracking-uri", digits_champion["tracking"], "--json",
                 paths[0]]) == 0
    assert f'"model": "emnist-digits v{version}"' in capsys.readouterr().out


def test_bad_images_get_their_own_errors_and_exit_2(digits_champion, rendered, tmp_path, capsys):
    good = [str(p) for p in rendered[0][:2]]
    (tmp_path / "notes.png").write_text("not an image\n")
    (tmp_path / "empty.jpg").write_bytes(b"")
    Image.new("L", (1, 1), 0).save(tmp_path / "dot.png")
    Image.new("RGB", (300, 400), (245, 240, 230)).save(tmp_path / "blank.png")
    Image.new("1", (10000, 10000), 1).save(tmp_path / "huge.png")  # 100 MP: a few KB of PNG
    jpeg = Path(rendered[0][0]).read_bytes() if rendered[0][0].suffix == ".jpg" else None
    assert jpeg is not None
    (tmp_path / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    bad = {
        "notes.png": "not an image",
        "empty.jpg": "empty",
        "dot.png": "1x1",
        "blank.png": "blank",
        "huge.png": "pixels",
        "cut.jpg": "decoded",
        "missing.png": "cannot read",
    }
    paths = [good[0], *(str(tmp_path / n) for n in bad), good[1]]
    rc = main(["predict", "--split", "digits", "--tracking-uri", digits_champion["tracking"], "--json", *paths])
    assert rc == 2
    out = json.loads(capsys.readouterr().out)
    assert [o["image"] for o in out] == paths
    assert "top" in out[0] and "top" in out[-1]  # the good images are still answered
    for o, (name, word) in zip(out[1:-1], bad.items()):
        assert "top" not in o and name in o["error"] and word in o["error"], o
    # text mode: answers on stdout, one error line per bad image on stderr
    rc = main(["predict", "--split", "digits", "--tracking-uri", digits_champion["tracking"], *paths])
    captured = capsys.readouterr()
    assert rc == 2
    assert len(captured.out.splitlines()) == 2
    assert len([e for e in captured.err.splitlines() if e.startswith("emnist-hpo: error: ")]) == len(bad)


def test_no_champion_is_one_clear_error(tmp_path, rendered, capsys):
    rc = main(["predict", "--split", "letters", "--tracking-uri", f"sqlite:///{tmp_path}/empty.db",
               str(rendered[0][0])])
    assert rc == 2
    assert "no champion model for split 'letters'" in capsys.readouterr().err


# ------------------------------------------------------------------ the preprocessing itself


def test_polarity_and_file_mode_do_not_change_the_result(digits, tmp_path):
    x = digits.x_test[3]
    outs = []
    for variant in VARIANTS:
        path, _ = render(x, variant, tmp_path / variant, np.random.default_rng(0))  # same size and place each time
        outs.append(prepare_file(path).image.astype(np.int16))
    for o in outs[1:]:
        assert np.abs(o - outs[0]).mean() < 4.0  # JPEG and palette quantisation aside, the same 28x28
    assert prepare_file(tmp_path / "jpeg.jpg").inverted and not prepare_file(tmp_path / "inverse.png").inverted


def test_output_looks_like_emnist(digits, tmp_path):
    """Ink box found where it was drawn; the character centred, spanning ~24 of 28 pixels like EMNIST's own."""
    rng = np.random.default_rng(3)
    for k in range(6):
        x = digits.x_test[100 + k]
        path, drawn = render(x, "jpeg", tmp_path / f"c{k}", rng)
        prep = prepare_file(path)
        assert prep.image.dtype == np.uint8 and prep.image.shape == (28, 28) and prep.image.max() == 255
        ink = np.argwhere(255 - np.asarray(Image.open(path).convert("L")) > 60)
        (top, left), (bottom, right) = ink.min(0), ink.max(0) + 1
        assert np.allclose(prep.box, (left, top, right, bottom), atol=0.05 * (bottom - top))  # faint edges aside
        assert drawn[0] <= prep.box[0] and prep.box[2] <= drawn[2]
        rows = np.flatnonzero(prep.image.max(1) > 30)
        cols = np.flatnonzero(prep.image.max(0) > 30)
        assert 21 <= max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 <= 26
        assert abs((rows[0] + rows[-1]) / 2 - 13.5) <= 1.5 and abs((cols[0] + cols[-1]) / 2 - 13.5) <= 1.5


def test_sixteen_bit_and_large_photos(digits, tmp_path):
    x = digits.x_test[5]
    big = Image.fromarray(255 - x).resize((1800, 1800), Image.Resampling.BICUBIC)
    photo = Image.new("L", (3000, 4000), 250)
    photo.paste(big, (600, 1500))
    photo.convert("RGB").save(tmp_path / "phone.jpg", quality=90)
    a = prepare_file(tmp_path / "phone.jpg").image
    Image.fromarray((np.asarray(photo, np.uint16) * 257)).save(tmp_path / "scan16.png")
    assert Image.open(tmp_path / "scan16.png").mode.startswith("I")
    b = prepare_file(tmp_path / "scan16.png").image
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 4.0


def test_tiny_or_flat_arrays_are_refused():
    with pytest.raises(ImageError, match="at least 8x8"):
        to_emnist(np.zeros((4, 40)))
    with pytest.raises(ImageError, match="blank"):
        to_emnist(np.full((50, 50), 128.0))


def test_float_tiff_with_nan_or_inf_gets_its_own_error(digits_champion, rendered, tmp_path, capsys):
    """A 32-bit float TIFF (Pillow mode F) holding inf or NaN: its own error line; the other images are answered."""
    good = str(rendered[0][0])
    ink = np.zeros((64, 64), np.float32)
    ink[12:52, 28:36] = 1.0
    paths = []
    for name, value in (("inf.tif", np.inf), ("nan.tif", np.nan), ("neg_inf.tif", -np.inf)):
        a = ink.copy()
        a[0, 0] = value
        Image.fromarray(a, mode="F").save(tmp_path / name)
        paths.append(str(tmp_path / name))
    assert Image.open(paths[0]).mode == "F"
    rc = main(["predict", "--split", "digits", "--tracking-uri", digits_champion["tracking"], "--json", good, *paths])
    assert rc == 2
    out = json.loads(capsys.readouterr().out)
    assert "top" in out[0] and len(out[0]["top"]) == 3
    for o, path in zip(out[1:], paths):
        assert "top" not in o and o["error"].startswith(path) and "NaN or infinite" in o["error"], o


@pytest.mark.parametrize("top", ["0", "-1", "11"])
def test_top_outside_one_to_the_number_of_classes_is_one_line(top, rendered, tmp_path, capsys):
    """Checked before anything loads: the tracking store is not even created."""
    store = tmp_path / "mlflow.db"
    rc = main(["predict", "--split", "digits", "--top", top, "--tracking-uri", f"sqlite:///{store}",
               str(rendered[0][0])])
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == ""
    assert captured.err == f"emnist-hpo: error: --top must be in 1..10, the number of classes of split 'digits' " \
                           f"(top={top})\n"
    assert not store.exists()


def test_top_can_list_every_class(digits_champion, rendered, capsys):
    rc = main(["predict", "--split", "digits", "--top", "10", "--tracking-uri", digits_champion["tracking"],
               "--json", str(rendered[0][0])])
    assert rc == 0
    top = json.loads(capsys.readouterr().out)[0]["top"]
    assert sorted(t["char"] for t in top) == [str(d) for d in range(10)]
    assert abs(sum(t["prob"] for t in top) - 1.0) < 1e-4
