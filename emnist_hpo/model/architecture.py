"""Shape arithmetic of the CNN family, without Keras: what fits a 28x28 input.

Every block is ``convs`` conv layers (``padding`` same or valid) followed by a
2x2 pooling layer, so the feature map shrinks block by block; a stack whose map
reaches zero is impossible and is never sampled (the search space checks its
bounds with :func:`max_blocks`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from emnist_hpo.errors import ConfigError

if TYPE_CHECKING:
    from emnist_hpo.config import ModelConfig

IMAGE_SIDE = 28


def feature_sides(kernels: Sequence[int], convs: Sequence[int], padding: str, side: int = IMAGE_SIDE) -> list[int]:
    """Side of the feature map after each block (may reach <= 0: does not fit)."""
    sides = []
    for k, n in zip(kernels, convs):
        for _ in range(n):
            side = side if padding == "same" else side - k + 1
        side = side // 2
        sides.append(side)
    return sides


def max_blocks(kernel: int, padding: str, convs: int = 1, side: int = IMAGE_SIDE) -> int:
    """The deepest stack of identical blocks that still leaves a map of at least 1x1."""
    n = 0
    while True:
        s = feature_sides([kernel] * (n + 1), [convs] * (n + 1), padding, side)
        if s[-1] < 1:
            return n
        n += 1


def check_fits(model: "ModelConfig", where: str = "config") -> None:
    """Raise :class:`ConfigError` if ``model``'s conv stack cannot run on a 28x28 image."""
    kernels = [b.kernel for b in model.conv_blocks]
    convs = [b.convs for b in model.conv_blocks]
    sides = feature_sides(kernels, convs, model.padding)
    for i, s in enumerate(sides):
        if s < 1:
            raise ConfigError(
                f"{where}: model.conv_blocks does not fit a {IMAGE_SIDE}x{IMAGE_SIDE} image: the feature map is "
                f"{s}x{s} after block {i} (kernels={kernels}, padding={model.padding!r}); use fewer blocks, "
                f"smaller kernels or padding 'same'"
            )
