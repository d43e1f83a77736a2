"""Shared command-line pieces of the SAE scripts (tyro dataclasses and input loading)."""

from __future__ import annotations

import dataclasses
import pathlib
import sys
from collections.abc import Callable

from openpi.interp.sae import data as sae_data
from openpi.shared.io import write_json_atomic


@dataclasses.dataclass
class RowArgs:
    """Which activation rows to analyse and their key columns."""

    activations: pathlib.Path
    """(rows, d) float .npy of activation vectors (memory-mapped)."""
    keys: pathlib.Path
    """.npz of key columns (docs/conventions.md), one entry per activation row."""
    select: tuple[str, ...] = ()
    """Row filters COLUMN=VALUE[,VALUE...] on the key columns (all must match), e.g. span=actions."""

    def open(self) -> sae_data.ActivationRows:
        return sae_data.open_rows(self.activations, self.keys, self.select)


def write_json(path: pathlib.Path, obj) -> None:
    """Write JSON (indent 1) atomically so a crash never leaves half a file."""
    write_json_atomic(path, obj, indent=1)


def main_guard(prog: str, fn: Callable[[], object]) -> None:
    """Run `fn`; turn input errors into one clear line on stderr and exit status 2."""
    try:
        fn()
    except (ValueError, KeyError, FileNotFoundError, FileExistsError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"{prog}: error: {msg}", file=sys.stderr)
        sys.exit(2)
