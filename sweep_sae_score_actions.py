"""Score SAEs by how well their codes read out actions (ridge, episode-grouped split).

    python sweep_sae_score_actions.py --saes 'runs/sae_*' --activations X.npy --keys KEYS.npz \
        --rollouts ROLLOUTS --out DIR [--select span=actions] [--label predicted|executed] \
        [--shard-index i --num-shards n]

--rollouts is the LIBERO client's --out-dir. The readout target is each row's action label: --label predicted (the
default) = the chunk action the row's token predicts, executed = the action executed at env step + token index.
Resumable and shardable; writes DIR/per_sae/*.json, then DIR/scores.json and DIR/scores.csv (schema and protocol:
openpi.interp.sae.sweep and openpi.interp.sae.scoring).
"""

from __future__ import annotations

import tyro

from openpi.interp.sae.cli import main_guard
from openpi.interp.sae.sweep import SweepArgs, run

if __name__ == "__main__":
    _args = tyro.cli(SweepArgs)
    main_guard("sweep_sae_score_actions.py", lambda: run(_args))
