"""Where experiment and search-space YAML files are found, from any working directory.

A name (``two_conv``, ``default``) is looked up in the working directory's
``experiments/`` or ``search_spaces/`` first (a user's own files win), then in the
files shipped with the package: the repository's top-level folders, installed as
the package data ``emnist_hpo.experiments`` and ``emnist_hpo.search_spaces``
(pyproject.toml maps them), so ``pip install .`` and ``emnist-hpo study`` work from
any folder.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from emnist_hpo.errors import ConfigError

#: The source checkout (the folder holding pyproject.toml), where there is one.
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def shipped(kind: str) -> list[Path]:
    """The folders holding the shipped ``kind`` files (``experiments`` or ``search_spaces``)."""
    out: list[Path] = []
    try:
        root = resources.files(f"emnist_hpo.{kind}")
        for entry in getattr(root, "_paths", None) or [root]:  # a namespace package may span several folders
            p = Path(str(entry))
            if p.is_dir():
                out.append(p)
    except (ModuleNotFoundError, TypeError):
        pass
    checkout = PROJECT_ROOT / kind
    if checkout.is_dir() and checkout not in out:
        out.append(checkout)
    return out


def _find(name: str, kind: str, what: str) -> Path:
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    if p.is_file():
        return p
    stem = p.name[: -len(p.suffix)] if p.suffix in (".yaml", ".yml") else p.name
    for folder in [Path.cwd() / kind, *shipped(kind)]:
        for cand in (folder / f"{stem}.yaml", folder / f"{stem}.yml"):
            if cand.is_file():
                return cand
    names = sorted({f.stem for folder in shipped(kind) for f in folder.glob("*.yaml")})
    raise ConfigError(f"{what} {name!r} not found: give a YAML path or one of {', '.join(names) or '(none shipped)'}")


def find_experiment(name: str) -> Path:
    """``name`` as a path, or ``experiments/<name>.yaml`` in the working directory or among the shipped ones."""
    return _find(name, "experiments", "experiment")


def find_search_space(name: str) -> Path:
    """``name`` as a path, or ``search_spaces/<name>.yaml`` in the working directory or among the shipped ones."""
    return _find(name, "search_spaces", "search space")
