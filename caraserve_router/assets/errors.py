"""The two errors of model preparation: the default model cannot be made (`ModelPrepError`),
or a model directory is one LightLLM cannot serve correctly (`ModelDirError`)."""
from __future__ import annotations

from pathlib import Path


class ModelPrepError(RuntimeError):
    """The default model could not be found or converted."""


class ModelDirError(ValueError):
    """A model directory LightLLM cannot serve correctly. `problems` lists every reason."""

    def __init__(self, path: Path | str, problems: list[str], fixable: bool = False):
        self.path = Path(path)
        self.problems = list(problems)
        self.fixable = fixable
        lines = [f"model directory {self.path} is not usable by CaraServe:"]
        lines += [f"  - {p}" for p in self.problems]
        if fixable:
            lines.append(
                "  (the fixable problems above can be repaired in place with "
                "validate_model_dir(path, fix=True) or `scripts/prepare_model.py --validate DIR --fix`)"
            )
        super().__init__("\n".join(lines))
