"""User-facing failures: each is printed by the CLI as one line, exit code 2."""

import re

_BREAK = re.compile(r"\s*\n\s*")


class ClearlmError(Exception):
    """A failure caused by the user's input or environment, not by a bug in clearlm. Printed as one line, even
    when it quotes a library's multi-line message (YAML's, for one)."""

    def __str__(self) -> str:
        return _BREAK.sub(" ", super().__str__())


class RecipeError(ClearlmError):
    """The recipe (or a command-line override) is invalid."""


class InputError(ClearlmError):
    """A data file or model folder is missing or malformed."""


class ArtifactError(ClearlmError):
    """An artifact on disk is missing, incomplete or inconsistent."""


class TrainingError(ClearlmError):
    """Training cannot go on (for example, the loss diverged)."""


class DiskFullError(ClearlmError):
    """A write failed, or would fail, for lack of space."""
