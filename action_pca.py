"""PCA of executed actions (standardised per dimension), coloured by suite / task / success.

    python action_pca.py --rollouts out/rollouts --out out/action_pca
    python action_pca.py --actions A.npy --episode-ids E.npy --suite-labels S.npy --task-labels T.npy \\
        --success-labels OK.npy --out out/action_pca

``--rollouts`` is the LIBERO client's output folder (its ``--out-dir``): the executed ``actions`` (T x 7) of every
episode record, labelled with the record's suite, task and success (episodes that executed no step are skipped
and listed). ``--actions`` takes an (n, D) array with optional per-row label arrays (e.g. an export's
``actions.npy`` with ``--episode-ids groups.npy --success-labels success.npy``).

Writes DIR/action_pca.json (schema: openpi.interp.action_pca and docs/probes.md), DIR/action_pca_scores.npy
((n, k) PC scores, rows in input order), plots ``explained_variance.png``, ``pca2d_by_<label>.png``,
``pca3d_by_<label>.png`` for label in suite / task / success, and ``trajectories_pc.png``.
"""

from __future__ import annotations

import matplotlib
import tyro

from openpi.interp.action_pca import PcaArgs, run

if __name__ == "__main__":
    matplotlib.use("Agg")
    run(tyro.cli(PcaArgs))
