"""Actions around each SAE feature's top-activating moments and their correlation with the rows' action labels.

    python sae/top_activating_actions.py --sae SAE_DIR --activations X.npy --keys KEYS.npz --rollouts ROLLOUTS \
        --out DIR [--features ...] [--sort-by action_corr] [--label predicted|executed]

--rollouts is the LIBERO client's --out-dir. The correlation uses each row's action label (--label predicted, the
default: the chunk action the row's token predicts; executed: the action executed at env step + token index).
Writes DIR/top_actions.json and DIR/top_actions.csv (schema: openpi.interp.sae.tools.top_actions).
"""

from __future__ import annotations

import dataclasses

import tyro

from openpi.interp.sae.cli import ToolArgs, main_guard
from openpi.interp.sae.tools import top_actions


@dataclasses.dataclass
class Args(ToolArgs):
    sort_by: str = "action_corr"
    """fire_rate | max_activation | mean_when_active | action_corr (max |correlation| with the action labels)."""


if __name__ == "__main__":
    _args = tyro.cli(Args)
    main_guard("top_activating_actions.py", lambda: top_actions(_args))
