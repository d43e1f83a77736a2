"""Steer a policy with an SAE feature: clamp, ablate or scale one latent at its site during closed-loop rollouts.

The edit changes only the chosen feature's contribution and keeps the SAE's reconstruction error, so a zero edit
is the identity: ``x' = x + (target - a_f(x)) * W_dec[f] / input_scale`` where ``a_f`` is the feature's inference
code (TopK or BatchTopK/JumpReLU), and ``target`` is 0 (ablate), ``value`` (clamp) or ``value * a_f`` (scale).
It plugs into the model as an ``Intervention(op="replace")`` at the SAE's site, so it is pure and jit-compiled.
"""
from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from openpi.interp.sae.io import load_sae
from openpi.interp.sae.model import jumprelu_codes, pre_activations
from openpi.models.hooks import Intervention
from openpi.policies.policy_config import DEFAULT_CONFIG
from openpi.shared.records import EpisodeRecord

MODES = ("ablate", "clamp", "scale")


def feature_edit_fn(sae_dir: str | pathlib.Path, feature: int, mode: str, value: float = 0.0
                    ) -> Callable[[jax.Array], jax.Array]:
    """A pure function (..., d_in) -> (..., d_in) editing one SAE feature of raw activations."""
    if mode not in MODES:
        raise ValueError(f"unknown steering mode {mode!r}; expected one of {MODES}")
    sae = load_sae(sae_dir)
    spec = sae.spec
    if not 0 <= feature < spec.d_sae:
        raise ValueError(f"feature {feature} out of range for {sae_dir} (d_sae = {spec.d_sae})")
    params = {k: jnp.asarray(v) for k, v in sae.params.items()}
    threshold = None if sae.threshold is None else jnp.asarray(sae.threshold)
    direction = params["W_dec"][feature] / spec.input_scale

    def code(x2d: jax.Array) -> jax.Array:
        pre = pre_activations(params, x2d * spec.input_scale)
        if spec.arch == "topk":
            kth = jax.lax.top_k(pre, spec.k)[0][:, -1]
            return jnp.where(pre[:, feature] >= kth, jax.nn.relu(pre[:, feature]), 0.0)
        return jumprelu_codes(pre, threshold)[:, feature]

    def edit(x: jax.Array) -> jax.Array:
        flat = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
        a = code(flat)
        target = {"ablate": jnp.zeros_like(a), "clamp": jnp.full_like(a, value), "scale": value * a}[mode]
        return (flat + (target - a)[:, None] * direction).reshape(x.shape).astype(x.dtype)

    edit.__name__ = f"sae_{mode}_f{feature}"
    return edit


@dataclasses.dataclass(frozen=True)
class SteeringSpec:
    sae_dir: str
    site: str
    feature: int
    mode: str = "ablate"
    value: float = 0.0
    tokens: str = "actions"
    steps: str = "all"

    def intervention(self) -> Intervention:
        return Intervention(self.site, "replace", tokens=self.tokens, steps=self.steps,
                            fn=feature_edit_fn(self.sae_dir, self.feature, self.mode, self.value))


def action_change(baseline: EpisodeRecord, steered: EpisodeRecord) -> dict:
    """Per-dimension mean |delta| of the first action chunk (same initial state, seed and noise, so the only
    difference is the edit) and of the executed actions over the common length of the two episodes."""
    for rec in (baseline, steered):
        if not rec.chunks:
            raise ValueError(f"{rec.path or rec.key.stem}: the episode has no action chunk (status {rec.status!r}, "
                             f"{rec.raw.get('failure_reason')}); nothing to compare")
    first_b, first_s = baseline.chunks[0].actions, steered.chunks[0].actions
    n = min(len(baseline.actions), len(steered.actions))
    exec_b, exec_s = baseline.actions[:n], steered.actions[:n]
    return {"first_chunk_mean_abs_delta": np.abs(first_s - first_b).mean(axis=0).tolist(),
            "executed_mean_abs_delta": np.abs(exec_s - exec_b).mean(axis=0).tolist() if n else None,
            "common_steps": n}


@dataclasses.dataclass
class SteerArgs:
    """Command line of sae/steer.py: one SAE feature edited in closed-loop LIBERO episodes vs the plain policy."""

    sae: str
    site: str
    """hook point the SAE was trained on, e.g. llm.expert1.layer.3.resid_post"""
    feature: int
    out: pathlib.Path
    mode: str = "ablate"
    """ablate | clamp (set to --value) | scale (multiply by --value)"""
    value: float = 0.0
    tokens: str = "actions"
    steps: str = "all"
    """denoising steps to edit ('all' or e.g. '0,1,2')"""
    config: str = DEFAULT_CONFIG
    """policy config (openpi.policies.policy_config)"""
    checkpoint_dir: str | None = None
    suite: str = "libero_spatial"
    task_ids: tuple[int, ...] = (0,)
    trials: int = 3
    max_steps: int | None = None
    seed: int = 7


def run_steering(args: SteerArgs) -> dict:
    """Baseline and steered runs on the same initial states (each a resumable rollout folder under OUT), then
    OUT/steer.json comparing them episode by episode (schema: sae/steer.py)."""
    from openpi.envs import rollout
    from openpi.policies.policy_config import create_policy
    from openpi.shared.io import write_json_atomic
    from openpi.shared.records import RolloutDir

    spec = SteeringSpec(args.sae, args.site, args.feature, args.mode, args.value, args.tokens, args.steps)
    intervention = spec.intervention()  # validates the SAE and feature before any rollout
    plan = rollout.plan_episodes(args.suite, list(args.task_ids), args.trials)
    policy = create_policy(args.config, args.checkpoint_dir)
    policy.table.validate((), (intervention,), num_steps=policy.num_steps)  # a site matching nothing: error now
    results = {}
    # The policy's flow-matching noise is keyed by (suite, task, episode, env step), so both runs see the same
    # noise at the same query whatever the episode lengths: the edit is the only difference.
    for name, interventions in (("baseline", ()), ("steered", (intervention,))):
        cfg = rollout.RolloutConfig(run_id=name, out_dir=args.out / name, video_dir=args.out / name / "videos",
                                    seed=args.seed, max_steps=args.max_steps)
        with policy.hooks(interventions):
            results[name] = rollout.evaluate(cfg, policy, plan, run_extra={"steering": dataclasses.asdict(spec)
                                                                           if name == "steered" else None})
    per_episode = []
    for ep in plan:
        records = {name: RolloutDir(args.out / name).record(ep.key(name)) for name in ("baseline", "steered")}
        per_episode.append({"task_id": ep.task_id, "episode": ep.episode,
                            "baseline_success": records["baseline"].success,
                            "steered_success": records["steered"].success,
                            **action_change(records["baseline"], records["steered"])})
    report = {"spec": dataclasses.asdict(spec),
              "baseline": {"success_rate": results["baseline"]["total"]["success_rate"]},
              "steered": {"success_rate": results["steered"]["total"]["success_rate"]},
              "per_episode": per_episode}
    report["delta_success_rate"] = report["steered"]["success_rate"] - report["baseline"]["success_rate"]
    write_json_atomic(args.out / "steer.json", report, indent=1)
    return report
