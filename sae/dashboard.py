"""Static HTML feature dashboard (offline): index sorted by a statistic, one page per feature.

    python sae/dashboard.py --sae SAE_DIR --activations X.npy --keys KEYS.npz [--rollouts ROLLOUTS] --out DIR \
        [--sort-by fire_rate|max_activation|mean_when_active|action_corr]

Open DIR/index.html in a browser. --rollouts (the LIBERO client's --out-dir) adds thumbnails (with its frames/),
actions and prompts. Layout and the mining.json schema: openpi.interp.sae.dashboard / .mining.
"""

from __future__ import annotations

import matplotlib
import tyro

from openpi.interp.sae.cli import ToolArgs, main_guard
from openpi.interp.sae.tools import dashboard

if __name__ == "__main__":
    matplotlib.use("Agg")
    _args = tyro.cli(ToolArgs)
    main_guard("dashboard.py", lambda: dashboard(_args))
