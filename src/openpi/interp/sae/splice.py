"""Splice an SAE's reconstruction back into the policy and measure how much of the action it preserves.

The analogue of language models' "cross-entropy loss recovered": for each observation, with the same noise,
compare the policy's action chunk (Pi0 or Diffusion Policy) when the site's activation (on the chosen tokens and
denoising steps) is
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

from openpi.interp.episode_frames import EpisodeFrames, frames_path
from openpi.interp.sae.io import load_sae
from openpi.models.hooks import Intervention, suggest
from openpi.policies.policy import META_PREFIX
from openpi.shared.records import RolloutDir


def observations_from_rollouts(rollouts_dir: str | pathlib.Path, max_obs: int | None = None) -> Iterator[dict]:
    """Policy observations at every queried step of every recorded episode with saved frames, in episode order
    (exactly the frames and state the policy was sent; the prompt from the episode record). Each carries its
    episode and env step as ``meta/`` keys, so a policy with an observation history (Diffusion Policy) is
    conditioned on the same earlier frames as in the rollout."""
    rollouts = RolloutDir(rollouts_dir)
    count = 0
    for rec in rollouts.records():
        path = frames_path(rollouts, rec)
        if not path.is_file():
            continue
        frames = EpisodeFrames.load(path)
        rows = np.flatnonzero(frames.queried) if frames.queried is not None else np.arange(len(frames.env_step))
        for t in rows:
            step = int(frames.env_step[t])
            meta = {"run_id": rec.key.run_id, "suite": rec.key.suite, "task_id": rec.key.task_id,
                    "episode": rec.key.episode, "attempt": rec.attempt, "env_step": step}
            yield {"observation/image": frames.images["base_0_rgb"][t],
                   "observation/wrist_image": frames.images["left_wrist_0_rgb"][t],
                   "observation/state": np.asarray(rec.states[step], np.float32), "prompt": rec.prompt,
                   **{f"{META_PREFIX}{k}": v for k, v in meta.items()}}
            count += 1
            if max_obs is not None and count >= max_obs:
                return
    if count == 0:
        raise FileNotFoundError(f"no recorded observations in {rollouts.root} (need episodes/*.json with "
                                "frames/*.npz; run the LIBERO client with --save-frames)")


def action_error_recovered(policy, sae_dir: str | pathlib.Path, site: str, observations: Iterable[dict], *,
                           tokens: str | None = None, steps: str = "all", seed: int = 0) -> dict:
    """Compare plain / SAE-spliced / zero-ablated actions of ``policy`` (a Pi0 or Diffusion Policy) on each
    observation. ``tokens`` (None): the action tokens where the site has a token axis, else the whole value."""
    if site not in policy.table:
        raise ValueError(f"site {site!r} is not a hook point of this policy; {suggest(site, policy.table.names)}")
    if tokens is None:
        tokens = "actions" if policy.table[site].token_axis is not None else "all"
    splice = load_sae(sae_dir).splice(site, tokens=tokens, steps=steps)
    zero = Intervention(site, "zero", tokens=tokens, steps=steps)
    rng = np.random.default_rng(seed)
    err_sae, err_zero = [], []
    for obs in observations:
        noise = rng.standard_normal(policy.noise_shape()).astype(np.float32)
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

