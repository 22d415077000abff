"""Published test accuracies per EMNIST split, each with its source, for ``compare``'s deltas.

``research`` rows are the per-split results of the research this project
reproduces; ``literature`` rows are the best published figures we could source
(papers and the Papers-with-Code archive). All are test accuracy in percent on
the official NIST test sets; results measured on the bundled sample or on a
subset are not directly comparable with them (``compare`` says which data a run saw).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Published:
    split: str  # EMNIST split
    accuracy: float  # test accuracy, percent
    model: str  # the model as its authors name it
    source: str  # where the figure is published
    kind: str = "literature"  # "research" (the project's own reference) or "literature"
    note: str = ""  # caveats (different test set, ensembles, ...)


_RESEARCH = "the research this project reproduces (per-split results table of its CNN)"
_WAVEMIX = "Jeevan et al. 2022, WaveMix: A Resource-efficient Neural Network for Image Analysis, arXiv:2205.14375"
_SPINAL = "Kabir et al. 2020, SpinalNet: Deep Neural Network with Gradual Input, arXiv:2007.03347"

PUBLISHED: tuple[Published, ...] = (
    Published("balanced", 88.3, "research CNN", _RESEARCH, "research"),
    Published("bymerge", 90.3, "research CNN", _RESEARCH, "research"),
    Published("byclass", 86.8, "research CNN", _RESEARCH, "research"),
    Published("letters", 93.9, "research CNN", _RESEARCH, "research"),
    Published("digits", 99.6, "research CNN", _RESEARCH, "research"),
    Published("mnist", 99.5, "research CNN", _RESEARCH, "research"),
    Published("balanced", 91.06, "WaveMix-Lite", _WAVEMIX),
    Published("balanced", 91.05, "VGG-5 (Spinal FC)", _SPINAL),
    Published("letters", 95.96, "WaveMixLite-112/16", _WAVEMIX + " (Papers-with-Code EMNIST-Letters leaderboard)"),
    Published("letters", 95.88, "VGG-5 (Spinal FC)", _SPINAL + " (Papers-with-Code EMNIST-Letters leaderboard)"),
    Published("digits", 99.84, "CNN with real-time augmentation (0.16% test error)",
              "j05t/emnist on GitHub (Keras, EMNIST-Digits, 40,000 test images)"),
    Published("mnist", 99.91, "heterogeneous ensemble of simple CNNs",
              "An et al. 2020, An Ensemble of Simple Convolutional Neural Network Models for MNIST Digit "
              "Recognition, arXiv:2008.10400",
              note="original MNIST test set (LeCun), not EMNIST-MNIST's"),
)


def for_split(split: str, kind: str | None = None) -> list[Published]:
    """Published figures of ``split`` (optionally of one kind), best first."""
    rows = [p for p in PUBLISHED if p.split == split and (kind is None or p.kind == kind)]
    return sorted(rows, key=lambda p: -p.accuracy)
