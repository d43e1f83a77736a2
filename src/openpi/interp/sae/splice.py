"""Splice an SAE's reconstruction back into the policy and measure how much of the action it preserves.

The analogue of language models' "cross-entropy loss recovered": for each observation, with the same flow noise,
compare the policy's action chunk when the site's activation (on the chosen tokens and denoising steps) is
  * left alone (reference a),
  * replaced by the SAE reconstruction (a_sae),
  * zero-ablated (a_zero, the "nothing kept" baseline),
and report  action_error_recovered = 1 - E||a_sae - a||^2 / E||a_zero - a||^2
(1 = the reconstruction is as good as the real activation, 0 = no better than deleting it; can be negative).
"""
from __future__ import annotations

import pathlib
from collections.abc import Iterable, Iterator

import numpy as np

from openpi.interp.sae.io import load_sae
from openpi.models.hooks import Intervention
from openpi.shared.io import read_json


def observations_from_rollouts(rollouts_dir: str | pathlib.Path, max_obs: int | None = None) -> Iterator[dict]:
    """Policy observations at every queried step of every recorded episode with saved frames (exactly the frames
    and state the policy was sent; the prompt from the episode record)."""
    root = pathlib.Path(rollouts_dir)
    count = 0
    for rec_path in sorted((root / "episodes").glob("*.json")):
        rec = read_json(rec_path, "episode record")
        frames_path = root / "frames" / f"{rec_path.stem}.npz"
        if not frames_path.is_file():
            continue
        with np.load(frames_path) as z:
            steps = np.flatnonzero(z["queried"])
            for t in steps:
                step = int(z["env_step"][t])
                yield {"observation/image": z["agentview"][t], "observation/wrist_image": z["wrist"][t],
                       "observation/state": np.asarray(rec["states"][step], np.float32), "prompt": rec["prompt"]}
                count += 1
                if max_obs is not None and count >= max_obs:
                    return
    if count == 0:
        raise FileNotFoundError(f"no recorded observations in {root} (need episodes/*.json with frames/*.npz; "
                                "run the LIBERO client with --save-frames)")


def action_error_recovered(policy, sae_dir: str | pathlib.Path, site: str, observations: Iterable[dict], *,
                           tokens: str = "actions", steps: str = "all", seed: int = 0) -> dict:
    """Compare plain / SAE-spliced / zero-ablated actions of ``policy`` (an openpi Policy) on each observation."""
    splice = load_sae(sae_dir).splice(site, tokens=tokens, steps=steps)
    zero = Intervention(site, "zero", tokens=tokens, steps=steps)
    cfg = policy.model.config
    rng = np.random.default_rng(seed)
    err_sae, err_zero = [], []
    for obs in observations:
        noise = rng.standard_normal((cfg.action_horizon, cfg.action_dim)).astype(np.float32)
        chunks = {}
        for name, ivs in (("plain", ()), ("sae", (splice,)), ("zero", (zero,))):
            with policy.hooks(ivs):
                chunks[name] = policy.infer(obs, noise=noise)["actions"]
        err_sae.append(float(np.mean((chunks["sae"] - chunks["plain"]) ** 2)))
        err_zero.append(float(np.mean((chunks["zero"] - chunks["plain"]) ** 2)))
    mse_sae, mse_zero = float(np.mean(err_sae)), float(np.mean(err_zero))
    return {"site": site, "tokens": tokens, "steps": steps, "n_observations": len(err_sae),
            "mse_spliced": mse_sae, "mse_zero_ablated": mse_zero,
            "action_error_recovered": None if mse_zero == 0 else 1.0 - mse_sae / mse_zero,
            "formula": "1 - mean||a_sae - a||^2 / mean||a_zero - a||^2 over observations (same noise per observation)"}

