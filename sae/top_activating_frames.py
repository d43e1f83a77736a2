"""Top-activating frames per SAE feature, with non-max suppression across episodes and time.

    python sae/top_activating_frames.py --sae SAE_DIR --activations X.npy --keys KEYS.npz --rollouts ROLLOUTS \
        --out DIR [--features 3 17] [--sort-by fire_rate --num-features 64] [--select span=actions]

--rollouts is the LIBERO client's --out-dir (recorded with --save-frames). Rows are joined to frames by (run_id,
suite, task_id, episode, env_step); a moment's activation is the max over its rows. Writes DIR/thumbs/*.png and
DIR/top_frames.json (schema: openpi.interp.sae.tools.top_frames).
"""

from __future__ import annotations

import tyro

from openpi.interp.sae.cli import ToolArgs, main_guard
from openpi.interp.sae.tools import top_frames

if __name__ == "__main__":
    _args = tyro.cli(ToolArgs)
    main_guard("top_activating_frames.py", lambda: top_frames(_args))
