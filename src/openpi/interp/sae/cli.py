"""Shared command-line pieces of the SAE scripts: one argument set for their inputs, declared once.

``sae/top_activating_{frames,actions,prompts}.py`` and ``sae/dashboard.py`` take :class:`ToolArgs` (``--sae
--activations --keys --rollouts --select`` plus mining options); ``sweep_sae_score_actions.py`` takes
:class:`RowInputs` (the same row inputs, many SAEs). The scripts only parse flags and call
``openpi.interp.sae.tools`` / ``openpi.interp.sae.sweep``.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
from collections.abc import Callable
from typing import Annotated

import tyro

from openpi.interp.join import JoinError
from openpi.interp.sae import data as sae_data
from openpi.interp.sae import io as sae_io
from openpi.interp.sae.mining import MiningConfig
from openpi.interp.store import StoreError
from openpi.shared.io import write_json_atomic
from openpi.shared.records import RecordError


@dataclasses.dataclass(kw_only=True)
class RowInputs:
    """Which activation rows to analyse, their key columns and the rollouts they came from."""

    activations: pathlib.Path
    """(rows, d) float .npy of activation vectors (memory-mapped), e.g. an export's X.npy."""
    keys: pathlib.Path
    """.npz of key columns (docs/conventions.md), one entry per activation row, e.g. an export's keys.npz."""
    rollouts: pathlib.Path | None = None
    """the LIBERO client's output folder (its --out-dir): records (action labels, prompts) and frames; only rows
    of the attempt that wrote each episode record are kept."""
    select: tuple[str, ...] = ()
    """Row filters COLUMN=VALUE[,VALUE...] on the key columns (all must match), e.g. span=actions."""

    def open(self, need_rollouts: str | None = None) -> sae_data.ActivationRows:
        """The selected rows; ``need_rollouts`` names what needs --rollouts when it is required."""
        if need_rollouts and self.rollouts is None:
            raise ValueError(f"--rollouts is required: {need_rollouts}")
        return sae_data.open_rows(self.activations, self.keys, self.select, self.rollouts)


@dataclasses.dataclass(kw_only=True)
class SaeInputs(RowInputs):
    """The rows plus the SAE to read them with."""

    sae: pathlib.Path
    """SAE folder (cfg.json + sae_weights.safetensors)."""

    def load(self):
        return sae_io.load_sae(self.sae)


@dataclasses.dataclass
class ToolArgs:
    """Arguments of the feature tools (top-activating frames / actions / prompts, dashboard)."""

    inputs: Annotated[SaeInputs, tyro.conf.OmitArgPrefixes]
    out: pathlib.Path
    mining: Annotated[MiningConfig, tyro.conf.OmitArgPrefixes] = dataclasses.field(default_factory=MiningConfig)
    features: tuple[int, ...] = ()
    """Feature ids to mine (default: the --num-features best by --sort-by)."""
    sort_by: str = "fire_rate"
    """fire_rate | max_activation | mean_when_active | action_corr (max |correlation| with the action labels)."""
    num_features: int = 64


def write_json(path: pathlib.Path, obj) -> None:
    """Write JSON (indent 1) atomically so a crash never leaves half a file."""
    write_json_atomic(path, obj, indent=1)


def main_guard(prog: str, fn: Callable[[], object]) -> None:
    """Run `fn`; turn input errors into one clear line on stderr and exit status 2."""
    try:
        fn()
    except (ValueError, KeyError, FileNotFoundError, FileExistsError, JoinError, RecordError, StoreError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"{prog}: error: {msg}", file=sys.stderr)
        sys.exit(2)
