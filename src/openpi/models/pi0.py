"""Pi0 / Pi0.5 flow-matching VLA: prefix/suffix embedding, loss and KV-cached Euler sampling.

Pure functions over the openpi parameter tree, so the same code serves actions and recording: pass a ``Hooks``
built from a record/intervention request and the recorded arrays come back next to the actions. Every hook point
the model calls is declared once in :func:`hook_points` (names, axes, token positions).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from openpi.models.hooks import (NO_HOOKS, AttentionKnockout, HookPoint, Hooks, HookTable, Intervention, Record,
                                 TokenMap, resolve_steps)
from openpi.models import gemma, layers, siglip
from openpi.models.config import Pi0Config, Pi0FASTConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Observation:
    """Model inputs after the policy transforms: images float32 in [-1, 1], (B, 224, 224, 3) per camera."""

    images: dict[str, jax.Array]
    image_masks: dict[str, jax.Array]
    state: jax.Array  # (B, action_dim)
    tokenized_prompt: jax.Array  # (B, max_token_len) int32
    tokenized_prompt_mask: jax.Array  # (B, max_token_len) bool


def prefix_spans(config: Pi0Config | Pi0FASTConfig) -> dict[str, tuple[int, int]]:
    """Static positions of the prefix (half-open): one span per camera slot, 'images', 'prompt' and 'prefix'."""
    n = config.tokens_per_image
    spans: dict[str, tuple[int, int]] = {key: (i * n, (i + 1) * n) for i, key in enumerate(config.image_keys)}
    spans["images"] = (0, len(config.image_keys) * n)
    spans["prompt"] = (spans["images"][1], config.prefix_len)
    spans["prefix"] = (0, config.prefix_len)
    return spans


def token_spans(config: Pi0Config) -> dict[str, tuple[int, int]]:
    """Static positions of the joint sequence [prefix | suffix] (half-open): one span per camera slot, 'images',
    'prompt', 'prefix', 'state' (empty for Pi0.5), 'actions' and 'suffix'."""
    spans = prefix_spans(config)
    p = config.prefix_len
    spans["state"] = (p, p) if config.pi05 else (p, p + 1)
    spans["actions"] = (spans["state"][1], spans["state"][1] + config.action_horizon)
    spans["suffix"] = (p, p + config.suffix_len)
    return spans


RESID_AXES = ("batch", "token", "d_model")
ATTN_AXES = ("batch", "head", "query", "key")


def image_hook_points(config: Pi0Config | Pi0FASTConfig) -> list[HookPoint]:
    """SigLIP residual streams and output tokens of every camera (shared by Pi0 and Pi0-FAST)."""
    spans = prefix_spans(config)
    pts: list[HookPoint] = []
    for key in config.image_keys:
        a, b = spans[key]
        for i in range(config.siglip.depth):
            for where, what in (("resid_pre", "before"), ("resid_post", "after")):
                pts.append(HookPoint(f"img.{key}.layer.{i}.{where}", RESID_AXES, False, a, b - a,
                                     f"SigLIP residual stream {what} block i of camera <cam>", "img.resid"))
        pts.append(HookPoint(f"img.{key}.out", RESID_AXES, False, a, b - a,
                             "image tokens after the `head` projection (what the language model sees)", "img.out"))
    return pts


def prefix_llm_hook_points(config: Pi0Config | Pi0FASTConfig, probs_description: str) -> list[HookPoint]:
    """PaliGemma residual streams and attention of the prefix pass, then its final norm (Pi0 and Pi0-FAST)."""
    p = config.prefix_len
    pts: list[HookPoint] = []
    for i in range(config.llm.depth):
        for where, what in (("resid_pre", "before layer i"), ("resid_mid", "after layer i's attention"),
                            ("resid_post", "after layer i's MLP")):
            pts.append(HookPoint(f"llm.expert0.layer.{i}.{where}", RESID_AXES, False, 0, p,
                                 f"PaliGemma expert residual (prefix tokens) {what}", "llm.expert0.resid"))
        pts.append(HookPoint(f"llm.layer.{i}.attn.prefix_probs", ATTN_AXES, False, 0, p, probs_description,
                             "llm.attn.prefix_probs"))
    pts.append(HookPoint("llm.expert0.final", RESID_AXES, False, 0, p, "PaliGemma expert after `final_norm`",
                         "llm.expert0.final"))
    return pts


def hook_points(config: Pi0Config) -> list[HookPoint]:
    """Every hook point ``sample_actions`` calls (HOOKS.md is generated from this list)."""
    spans = token_spans(config)
    p, s = config.prefix_len, config.suffix_len
    resid = RESID_AXES
    suffix = "action tokens" if config.pi05 else "[state] + action tokens"
    pts = image_hook_points(config)
    pts += prefix_llm_hook_points(
        config, "attention probabilities of the prefix pass (image/text queries over prefix keys)")
    depth = config.llm.depth
    pts.append(HookPoint("flow.time", ("batch",), True, None, None, "t at the step (1.0, 0.9, ..., 0.1)",
                         "flow.time"))
    a, b = spans["actions"]
    pts.append(HookPoint("flow.x_t", ("batch", "token", "action_dim"), True, a, b - a,
                         "noisy action chunk entering the step (one row per action token)", "flow.x_t"))
    for i in range(depth):
        for where, what in (("resid_pre", "before layer i"), ("resid_mid", "after layer i's attention"),
                            ("resid_post", "after layer i's MLP")):
            pts.append(HookPoint(f"llm.expert1.layer.{i}.{where}", resid, True, p, s,
                                 f"action-expert residual (suffix: {suffix}) {what}",
                                 "llm.expert1.resid"))
        pts.append(HookPoint(f"llm.layer.{i}.attn.probs", ATTN_AXES, True, p, s,
                             f"attention of the suffix queries ({suffix}) over all keys [prefix, suffix]",
                             "llm.attn.probs"))
    pts.append(HookPoint("llm.expert1.final", resid, True, p, s,
                         "action expert after `final_norm_1` (adaptive for Pi0.5)", "llm.expert1.final"))
    pts.append(HookPoint("flow.v_t", ("batch", "token", "action_dim"), True, a, b - a,
                         "predicted velocity of the step", "flow.v_t"))
    return pts


def hook_table(config: Pi0Config) -> HookTable:
    return HookTable(hook_points(config), token_spans(config), config.prefix_len + config.suffix_len)


def _dtype(config: Pi0Config):
    return jnp.dtype(config.dtype)


@dataclasses.dataclass(frozen=True)
class PrefixLayout:
    """Which prefix tokens a batch actually uses: the camera slots valid for some sample and the first
    ``prompt_len`` prompt slots. Everything else is masked for every sample, so nothing attends to it and it does
    not advance the positions (``cumsum(mask) - 1``): dropping it before the transformer changes no valid token's
    output, only the work (static, so each layout compiles once)."""

    cameras: tuple[str, ...]
    prompt_len: int

    def num_tokens(self, config: Pi0Config | Pi0FASTConfig) -> int:
        return len(self.cameras) * config.tokens_per_image + self.prompt_len

    def token_map(self, config: Pi0Config) -> TokenMap:
        """Which joint tokens of the full layout [prefix | suffix] this layout computes."""
        spans = prefix_spans(config)
        keep = np.ones(config.prefix_len + config.suffix_len, bool)
        keep[:config.prefix_len] = False
        for key in self.cameras:
            keep[slice(*spans[key])] = True
        start = spans["prompt"][0]
        keep[start:start + self.prompt_len] = True
        return TokenMap(tuple(bool(v) for v in keep))


def compact_layout(config: Pi0Config | Pi0FASTConfig, obs, prompt_bucket: int = 8,
                   required: np.ndarray | None = None) -> PrefixLayout | None:
    """The smallest layout keeping every valid prefix token of ``obs`` (concrete arrays) and every joint token
    ``required`` marks (what recordings and edits read: :meth:`HookTable.required_tokens`), or None when it would
    drop nothing. The prompt length is rounded up to ``prompt_bucket`` so varying prompts share few compilations."""
    spans = prefix_spans(config)
    need = np.zeros(config.prefix_len, bool) if required is None else np.asarray(required, bool)[:config.prefix_len]
    cameras = tuple(k for k in config.image_keys if (k in obs.image_masks and bool(np.any(obs.image_masks[k])))
                    or need[slice(*spans[k])].any())
    valid = np.asarray(obs.tokenized_prompt_mask, bool)
    used = int(np.max(np.nonzero(valid.any(axis=0))[0], initial=-1)) + 1
    prompt_len = min(valid.shape[1], -(-used // prompt_bucket) * prompt_bucket)
    prompt_needed = np.nonzero(need[spans["prompt"][0]:])[0]
    if prompt_needed.size:
        prompt_len = max(prompt_len, int(prompt_needed[-1]) + 1)
    if not cameras and prompt_len == 0:
        return None  # an all-masked prefix: nothing to keep, run the full layout as openpi does
    if cameras == tuple(config.image_keys) and prompt_len == valid.shape[1]:
        return None
    return PrefixLayout(cameras, prompt_len)


def embed_prefix(config: Pi0Config | Pi0FASTConfig, params: dict, obs, hooks: Hooks = NO_HOOKS,
                 layout: PrefixLayout | None = None):
    """Image tokens of every camera slot, then prompt tokens. Returns (tokens, input_mask, ar_mask).

    With a ``layout`` only its cameras are encoded and the prompt is cut to its length (see :class:`PrefixLayout`).
    Shared with Pi0-FAST, whose observation has the same image and prompt fields."""
    dtype = _dtype(config)
    pg = params["PaliGemma"]
    tokens, masks = [], []
    for key in config.image_keys:
        if key not in obs.images:
            raise KeyError(f"observation has no image {key!r}; model expects cameras {list(config.image_keys)}")
        if layout is not None and key not in layout.cameras:
            continue
        img = siglip.encode(pg["img"], obs.images[key], config.siglip, dtype, camera=key, hooks=hooks)
        tokens.append(img)
        masks.append(jnp.repeat(obs.image_masks[key][:, None], img.shape[1], axis=1))
    prompt, prompt_mask = obs.tokenized_prompt, obs.tokenized_prompt_mask
    if layout is not None:
        prompt, prompt_mask = prompt[:, :layout.prompt_len], prompt_mask[:, :layout.prompt_len]
    text = gemma.embed_tokens(pg["llm"], prompt, config.llm.width, dtype)
    tokens.append(text)
    masks.append(prompt_mask)
    x = jnp.concatenate([t.astype(dtype) for t in tokens], axis=1)
    input_mask = jnp.concatenate(masks, axis=1)
    ar_mask = jnp.zeros(x.shape[1], dtype=bool)
    return x, input_mask, ar_mask


def embed_suffix(config: Pi0Config, params: dict, obs: Observation, x_t: jax.Array, time: jax.Array):
    """Pi0: state token + action tokens mixed with the time embedding by an MLP. Pi0.5: action tokens only, the
    time embedding becomes the adaptive-norm conditioning vector. Returns (tokens, input_mask, ar_mask, cond)."""
    dtype = _dtype(config)
    width = config.expert.width
    b = x_t.shape[0]
    time_emb = layers.posemb_sincos(time, width, min_period=4e-3, max_period=4.0)
    action_tokens = layers.dense(params["action_in_proj"], x_t)
    pieces, ar = [], []
    if config.pi05:
        cond = layers.dense(params["time_mlp_in"], time_emb)
        cond = jax.nn.swish(cond)
        cond = jax.nn.swish(layers.dense(params["time_mlp_out"], cond))
        tokens = action_tokens
    else:
        state_token = layers.dense(params["state_proj"], obs.state)[:, None, :]
        pieces.append(state_token)
        ar.append(True)
        time_tokens = jnp.repeat(time_emb[:, None, :], config.action_horizon, axis=1)
        mixed = jnp.concatenate([action_tokens, time_tokens], axis=-1)
        mixed = jax.nn.swish(layers.dense(params["action_time_mlp_in"], mixed))
        tokens = layers.dense(params["action_time_mlp_out"], mixed)
        cond = None
    pieces.append(tokens)
    ar += [True] + [False] * (config.action_horizon - 1)
    x = jnp.concatenate(pieces, axis=1).astype(dtype)
    input_mask = jnp.ones((b, x.shape[1]), dtype=bool)
    return x, input_mask, jnp.asarray(ar), None if cond is None else cond.astype(dtype)


def _cfgs(config: Pi0Config):
    return (config.llm, config.expert)


def _velocity(config: Pi0Config, params: dict, suffix_out: jax.Array) -> jax.Array:
    out = suffix_out[:, -config.action_horizon:]
    return layers.dense(params["action_out_proj"], out).astype(jnp.float32)


def joint_forward(config: Pi0Config, params: dict, obs: Observation, x_t: jax.Array, time: jax.Array):
    """One forward of prefix + suffix together (training path, no hooks). Returns (suffix_out, v_t)."""
    prefix, prefix_mask, prefix_ar = embed_prefix(config, params, obs)
    suffix, suffix_mask, suffix_ar, cond = embed_suffix(config, params, obs, x_t, time)
    input_mask = jnp.concatenate([prefix_mask, suffix_mask], axis=1)
    ar_mask = jnp.concatenate([prefix_ar, suffix_ar])
    mask = layers.make_attn_mask(input_mask, ar_mask)
    positions = jnp.cumsum(input_mask, axis=1) - 1
    (_, suffix_out), _ = gemma.forward(params["PaliGemma"]["llm"], [prefix, suffix], positions, mask, _cfgs(config),
                                       conds=(None, cond))
    return suffix_out, _velocity(config, params, suffix_out)


def compute_loss(config: Pi0Config, params: dict, obs: Observation, actions: jax.Array, *,
                 rng: jax.Array | None = None, noise: jax.Array | None = None, time: jax.Array | None = None):
    """Per-step flow-matching loss (B, horizon): mean over action dims of (v_t - (noise - actions))^2.

    Noise and time are drawn from ``rng`` unless given explicitly (t ~ Beta(1.5, 1) * 0.999 + 0.001).
    """
    if noise is None or time is None:
        if rng is None:
            raise ValueError("compute_loss needs rng unless both noise and time are given")
        noise_rng, time_rng = jax.random.split(rng)
        if noise is None:
            noise = jax.random.normal(noise_rng, actions.shape)
        if time is None:
            time = jax.random.beta(time_rng, 1.5, 1.0, actions.shape[:1]) * 0.999 + 0.001
    t = time[:, None, None]
    x_t = t * noise + (1 - t) * actions
    u_t = noise - actions
    _, v_t = joint_forward(config, params, obs, x_t, time)
    return jnp.mean(jnp.square(v_t - u_t), axis=-1)


def sample_actions(config: Pi0Config, params: dict, obs: Observation, noise: jax.Array, *, num_steps: int = 10,
                   records: tuple[Record, ...] = (), interventions: tuple[Intervention, ...] = (),
                   knockouts: tuple[AttentionKnockout, ...] = (), layout: PrefixLayout | None = None
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Euler integration of the flow from t = 1 (noise) to t = 0 with the prefix computed once into a KV cache.

    Returns (actions (B, horizon, action_dim), recordings). Denoising-step sites come back with a leading step axis
    holding only the requested steps; prefix-pass sites have none. With no request the graph is the plain one.
    ``layout`` (from :func:`compact_layout`) drops prefix tokens no sample uses. Requests keep the full layout's
    positions, and recordings come back in it; the layout must keep every token they select (pass
    ``required=hook_table(config).required_tokens(records, interventions)`` to :func:`compact_layout`).
    """
    records, interventions, knockouts = tuple(records), tuple(interventions), tuple(knockouts)
    table = None
    if records or interventions or knockouts:
        table = hook_table(config)
        table.validate(records, interventions, knockouts, num_steps)
    token_map = None if layout is None or table is None else layout.token_map(config)
    hooks = Hooks(records=records, interventions=interventions, knockouts=knockouts, table=table,
                  num_steps=num_steps, token_map=token_map)
    prefix, prefix_mask, prefix_ar = embed_prefix(config, params, obs, hooks, layout)
    prefix_attn = layers.make_attn_mask(prefix_mask, prefix_ar)
    positions = jnp.cumsum(prefix_mask, axis=1) - 1
    _, kv_cache = gemma.forward(params["PaliGemma"]["llm"], [prefix, None], positions, prefix_attn, _cfgs(config),
                                hooks=hooks, prefix_pass=True)
    recorded = dict(hooks.collected)
    dt = -1.0 / num_steps
    b = noise.shape[0]
    prefix_valid = jnp.sum(prefix_mask, axis=-1)

    def step(carry, index):
        x_t, time = carry
        step_hooks = hooks.for_step(index)
        step_hooks("flow.time", jnp.broadcast_to(time, (b,)))
        x_t = step_hooks("flow.x_t", x_t)
        suffix, suffix_mask, suffix_ar, cond = embed_suffix(config, params, obs, x_t, jnp.broadcast_to(time, (b,)))
        suffix_attn = layers.make_attn_mask(suffix_mask, suffix_ar)
        prefix_part = jnp.repeat(prefix_mask[:, None, :], suffix.shape[1], axis=1)
        mask = jnp.concatenate([prefix_part, suffix_attn], axis=-1)
        pos = prefix_valid[:, None] + jnp.cumsum(suffix_mask, axis=-1) - 1
        (_, suffix_out), _ = gemma.forward(params["PaliGemma"]["llm"], [None, suffix], pos, mask, _cfgs(config),
                                           conds=(None, cond), kv_cache=kv_cache, hooks=step_hooks,
                                           query_start=prefix.shape[1])
        v_t = step_hooks("flow.v_t", _velocity(config, params, suffix_out))
        return (x_t + dt * v_t, time + dt), step_hooks.collected

    (x_0, _), per_step = jax.lax.scan(step, (noise, jnp.asarray(1.0, jnp.float32)), jnp.arange(num_steps))
    for name, arr in per_step.items():
        steps = hooks.record_for(name).steps
        recorded[name] = arr[jnp.asarray(resolve_steps(steps, num_steps))]
    return x_0, recorded
