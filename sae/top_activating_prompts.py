"""Tasks and prompts on which each SAE feature fires (rows joined to rollout records by keys).

    python sae/top_activating_prompts.py --sae SAE_DIR --activations X.npy --keys KEYS.npz [--rollouts ROLLOUTS] \
        --out DIR

Tasks come from the key columns (suite, task_id); prompts from the episode records of --rollouts (the LIBERO
client's --out-dir). Writes DIR/top_prompts.json (schema: openpi.interp.sae.tools.top_prompts); fire_rate =
fraction of the group's rows where the feature is non-zero; mean_activation = mean over all the group's rows.
"""

from __future__ import annotations

import tyro

from openpi.interp.sae.cli import ToolArgs, main_guard
from openpi.interp.sae.tools import top_prompts

if __name__ == "__main__":
    _args = tyro.cli(ToolArgs)
    main_guard("top_activating_prompts.py", lambda: top_prompts(_args))
