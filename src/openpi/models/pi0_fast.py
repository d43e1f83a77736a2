"""Pi0-FAST: PaliGemma generating FAST action tokens autoregressively (pure functions over openpi's params).

The model is SigLIP + one Gemma (PaliGemma's weights, tied input/output embedding). Its input is
``[camera 0 | camera 1 | camera 2 | prompt]`` (the *prefix*, ``P = prefix_len`` positions); attention is prefix-LM:
bidirectional where the autoregressive mask is 0 and causal where it is 1 (the ``"Action: " + FAST tokens + "|" +
EOS`` postfix in training). Training (:func:`compute_loss`) is one forward over the whole sequence;
inference (:func:`sample_actions`) fills a KV cache with the prefix, then decodes one token per step in a
``lax.while_loop`` that stops at end-of-sequence.

**Joint sequence and cache layout.** Cache slot ``j < P`` holds prefix token ``j`` in input order; slot ``P + s``
holds the token generated at decoding step ``s``. openpi instead *right-aligns* each row (rolls it so its last
valid token sits at slot ``P - 1``); attention does not depend on where a key is stored, so we keep input order
(static camera spans, no per-row roll) and reproduce openpi's masks and RoPE positions in that order. Every
number matches openpi's; :func:`align_like_openpi` maps our layout onto openpi's for comparisons.

**openpi's decoding, reproduced by default** (``config.decode_attention/decode_positions/eos_stop == "openpi"``),
with the corrected paths as options. With ``n`` = valid prefix tokens (``prefill_len``) and ``e`` = index of the
last valid prefix token + 1:

- *Decode attention* (``decode_attention``). openpi lets generated tokens attend to the last ``n`` slots of the
  aligned prefix, i.e. input positions ``[e - n, e)``. That equals "all valid prefix tokens" only when the valid
  tokens are contiguous. With a masked camera (or any hole before the last valid token) the window is shifted:
  generated tokens attend to the masked camera's tokens (whose keys carry the uniform-attention garbage of fully
  masked rows) and *not* to the first ``e - n`` valid tokens (e.g. the base camera). ``"valid"`` attends exactly to
  the valid prefix tokens plus the generated ones. openpi's FAST policies always pass all-True image masks, where
  both agree.
- *Decode positions* (``decode_positions``). openpi feeds the token generated at step ``s`` at RoPE position
  ``n + s + 1``; in training the same token (postfix token ``s``) sits at ``n + s``: every generated token is one
  position further from the prefix than it was trained. ``"contiguous"`` uses ``n + s``.
- *Stopping* (``eos_stop``). openpi stops when every sample emits EOS *at the same step*; a sample that finished
  earlier keeps generating (its later tokens are garbage that the action parser ignores) and the batch runs to
  ``max_decoding_steps`` unless the EOS steps coincide. ``"per_sample"`` tracks which samples are done, writes the
  pad id 0 after a sample's EOS and stops when all are done (same tokens up to each EOS, fewer steps).

Not an option: training positions are ``arange`` over the whole input (masked/padded tokens counted, as openpi's
``compute_loss`` passes none), inference positions count valid tokens only; they agree unless a camera is masked.

**Hook points** (:func:`hook_points`): the prefix pass has Pi0's names (``img.<cam>.*``,
``llm.expert0.layer.<i>.resid_{pre,mid,post}``, ``llm.layer.<i>.attn.prefix_probs``, ``llm.expert0.final``);
every decoding step has ``llm.logits`` (the logits step ``s``'s token is drawn from; step 0 = the last prefix
token's), ``llm.decode.layer.<i>.resid_{pre,mid,post}``, ``llm.layer.<i>.attn.probs`` and ``llm.decode.final`` for
the token generated at step ``s``. Their token/query axis has one element whose joint index depends on the step:
``token_start`` is ``P`` (the first generated slot) and **joint index = token_start + step**. Attention keys are the
``P + max_decoding_steps`` cache slots in joint order (prefix in input order, then generated tokens), so camera
spans key attention rows exactly as Pi0's do. Token selectors on decoding-step points must be ``all`` (or the joint
index ``P``, meaning "the step's token").
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from openpi.models import gemma, layers, pi0
from openpi.models.config import Pi0FASTConfig
from openpi.models.hooks import NO_HOOKS, AttentionKnockout, HookPoint, Hooks, HookTable, Intervention, Record, \
    resolve_steps

PREFIX_STREAM = ("llm.expert0",)
DECODE_STREAM = ("llm.decode",)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Observation:
    """Model inputs: images float32 in [-1, 1], (B, 224, 224, 3) per camera, and the tokenized prompt.

    The robot state is not a field: Pi0-FAST only sees it as discretised text inside the prompt.
    """

    images: dict[str, jax.Array]
    image_masks: dict[str, jax.Array]
    tokenized_prompt: jax.Array  # (B, max_token_len) int32
    tokenized_prompt_mask: jax.Array  # (B, max_token_len) bool
    token_ar_mask: jax.Array  # (B, max_token_len) int32: 0 bidirectional prefix, 1 causal postfix
    token_loss_mask: jax.Array  # (B, max_token_len) bool: positions whose token is predicted in the loss


class DecodeOutput(NamedTuple):
    tokens: jax.Array  # (B, max_decoding_steps) int32 generated ids; 0 after the last executed step
    num_steps: jax.Array  # () int32 decoding steps executed before the stop
    recordings: dict[str, jax.Array]


# ------------------------------------------------------------------------------------------------ hook table


def _steps(config: Pi0FASTConfig, max_decoding_steps: int | None) -> int:
    return config.max_decoding_steps if max_decoding_steps is None else int(max_decoding_steps)


def token_spans(config: Pi0FASTConfig, max_decoding_steps: int | None = None) -> dict[str, tuple[int, int]]:
    """Joint-sequence spans (half-open): cameras, 'images', 'prompt', 'prefix' and 'generated' (the cache slots of
    the decoded tokens, one per step)."""
    spans = pi0.prefix_spans(config)
    p = config.prefix_len
    spans["generated"] = (p, p + _steps(config, max_decoding_steps))
    return spans


def hook_points(config: Pi0FASTConfig, max_decoding_steps: int | None = None) -> list[HookPoint]:
    """Every hook point ``sample_actions`` calls. Decoding-step points: one token, joint index = P + step."""
    p = config.prefix_len
    seq = p + _steps(config, max_decoding_steps)
    resid = pi0.RESID_AXES
    pts = pi0.image_hook_points(config)
    pts += pi0.prefix_llm_hook_points(
        config, f"attention of the prefix pass: prefix queries over all {seq} cache slots (generated slots are "
                "still empty; only fully masked query rows put weight there)")
    pts.append(HookPoint("llm.logits", ("batch", "vocab"), True, None, None,
                         "logits the step's token is drawn from (step 0: last valid prefix token; before the "
                         "temperature)", "llm.logits"))
    for i in range(config.llm.depth):
        for where, what in (("resid_pre", "before layer i"), ("resid_mid", "after layer i's attention"),
                            ("resid_post", "after layer i's MLP")):
            pts.append(HookPoint(f"llm.decode.layer.{i}.{where}", resid, True, p, 1,
                                 f"residual of the token generated at the step {what} (joint index P + step)",
                                 "llm.decode.resid", token_step_stride=1))
        pts.append(HookPoint(f"llm.layer.{i}.attn.probs", pi0.ATTN_AXES, True, p, 1,
                             f"attention of the step's token (query joint index P + step) over all {seq} keys "
                             "[prefix in input order, generated tokens]", "llm.attn.probs", token_step_stride=1))
    pts.append(HookPoint("llm.decode.final", resid, True, p, 1,
                         "the step's token after `final_norm` (its logits are the next step's llm.logits)",
                         "llm.decode.final", token_step_stride=1))
    return pts


def hook_table(config: Pi0FASTConfig, max_decoding_steps: int | None = None) -> HookTable:
    m = _steps(config, max_decoding_steps)
    return HookTable(hook_points(config, m), token_spans(config, m), config.prefix_len + m)


# ------------------------------------------------------------------------------------------------ forward pass


def embed_inputs(config: Pi0FASTConfig, params: dict, obs: Observation, hooks: Hooks = NO_HOOKS):
    """Image tokens of every camera then prompt tokens. Returns (tokens, input_mask, ar_mask (B, P) int32)."""
    x, input_mask, _ = pi0.embed_prefix(config, params, obs, hooks)
    b, n_img = x.shape[0], x.shape[1] - obs.tokenized_prompt.shape[1]
    ar = jnp.concatenate([jnp.zeros((b, n_img), jnp.int32), obs.token_ar_mask.astype(jnp.int32)], axis=1)
    return x, input_mask, ar


def _llm(params: dict) -> dict:
    return params["PaliGemma"]["llm"]


def training_positions(batch: int, length: int) -> jax.Array:
    """RoPE positions of the training forward: 0..T-1, masked and padded tokens counted (openpi passes none)."""
    return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))


def _forward(config: Pi0FASTConfig, params: dict, x: jax.Array, mask: jax.Array) -> jax.Array:
    """Training-style forward without cache. Returns final-norm outputs (B, T, D)."""
    positions = training_positions(*x.shape[:2])
    (out,), _ = gemma.forward(_llm(params), [x], positions, mask, (config.llm,), streams=PREFIX_STREAM)
    return out


def forward(config: Pi0FASTConfig, params: dict, obs: Observation) -> tuple[jax.Array, jax.Array]:
    """Full forward over every input position. Returns (pre_logits (B, P, D), prompt logits (B, L, vocab))."""
    x, input_mask, ar = embed_inputs(config, params, obs)
    pre_logits = _forward(config, params, x, layers.make_attn_mask(input_mask, ar))
    prompt = pre_logits[:, pre_logits.shape[1] - obs.tokenized_prompt.shape[1]:]
    return pre_logits, gemma.decode_logits(_llm(params), prompt)


def next_token_logits(config: Pi0FASTConfig, params: dict, obs: Observation) -> jax.Array:
    """Logits predicting prompt token j+1 at every prompt position j: (B, L-1, vocab).

    As openpi's ``compute_loss``: the last input token is not fed (nothing follows it), positions are 0..T-2. (At
    padded positions this differs slightly from :func:`forward`: their uniform attention has one key fewer.)
    """
    x, input_mask, ar = embed_inputs(config, params, obs)
    mask = layers.make_attn_mask(input_mask, ar)
    pre_logits = _forward(config, params, x[:, :-1], mask[:, :-1, :-1])
    return gemma.decode_logits(_llm(params), pre_logits[:, -(obs.tokenized_prompt.shape[1] - 1):])


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """-log softmax(logits)[target] per position: (B, T)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def compute_loss(config: Pi0FASTConfig, params: dict, obs: Observation) -> jax.Array:
    """Per-sample next-token cross-entropy averaged over ``token_loss_mask[:, 1:]`` (B,)."""
    nll = token_nll(next_token_logits(config, params, obs), obs.tokenized_prompt[:, 1:])
    loss_mask = obs.token_loss_mask[:, 1:].astype(jnp.float32)
    return jnp.sum(nll * loss_mask, axis=-1) / jnp.clip(jnp.sum(loss_mask, axis=-1), 1)


# ------------------------------------------------------------------------------------------------ decoding


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PrefixLayout:
    """Where the valid prefix sits: ``end`` = index of the last valid token + 1 (openpi's ``seqlen``),
    ``prefill_len`` = number of valid tokens, ``positions`` = RoPE positions in input order."""

    end: jax.Array  # (B,) int32
    prefill_len: jax.Array  # (B,) int32
    positions: jax.Array  # (B, P) int32


def prefix_layout(input_mask: jax.Array) -> PrefixLayout:
    """openpi's prefill positions (cumulative count of valid tokens - 1, computed after right-alignment) in input
    order: tokens after the last valid one were rolled to the front by the alignment and get -1."""
    index = jnp.arange(input_mask.shape[1], dtype=jnp.int32)
    end = jnp.max(jnp.where(input_mask, index, 0), axis=-1) + 1
    count = jnp.cumsum(input_mask, axis=-1, dtype=jnp.int32) - 1
    positions = jnp.where(index[None] < end[:, None], count, -1)
    return PrefixLayout(end.astype(jnp.int32), jnp.sum(input_mask, axis=-1, dtype=jnp.int32), positions)


def align_like_openpi(x: jax.Array, layout: PrefixLayout, axes: tuple[int, ...] = (1,)) -> jax.Array:
    """Roll each row of ``x`` along ``axes`` (prefix-length axes, input order) into openpi's right-aligned cache
    order: input position ``j`` goes to slot ``(j - end) mod P``."""
    def one(row, end):
        return jnp.roll(row, -end, axis=tuple(a - 1 for a in axes))
    return jax.vmap(one)(x, layout.end)


def decode_position(config: Pi0FASTConfig, layout: PrefixLayout, step: jax.Array) -> jax.Array:
    """RoPE position (B,) of the token generated at ``step`` (see the module docstring)."""
    return layout.prefill_len + step + (1 if config.decode_positions == "openpi" else 0)


def decode_mask(config: Pi0FASTConfig, layout: PrefixLayout, input_mask: jax.Array, step: jax.Array,
                num_slots: int) -> jax.Array:
    """(B, 1, num_slots) keys visible to the token generated at ``step`` (cache slots in joint order)."""
    p = input_mask.shape[1]
    slot = jnp.arange(num_slots)
    generated = (slot >= p) & (slot <= p + step)
    if config.decode_attention == "openpi":
        start = layout.end - layout.prefill_len
        prefix = (slot[None] >= start[:, None]) & (slot[None] < layout.end[:, None])
    else:
        prefix = jnp.pad(input_mask, ((0, 0), (0, num_slots - p)))
    return (prefix | generated[None])[:, None, :]


def _sample(logits: jax.Array, rng: jax.Array, temperature) -> jax.Array:
    """argmax at temperature 0, else a categorical draw from logits / temperature (as openpi)."""
    greedy = lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32)  # noqa: E731
    if isinstance(temperature, (int, float)):
        if temperature <= 0:
            return greedy()
        return jax.random.categorical(rng, logits / temperature, axis=-1).astype(jnp.int32)
    return jax.lax.cond(temperature > 0.0,
                        lambda: jax.random.categorical(rng, logits / temperature, axis=-1).astype(jnp.int32),
                        greedy)


def prefill_mask(input_mask: jax.Array, ar_mask: jax.Array, max_decoding_steps: int) -> jax.Array:
    """(B, P, P + max_decoding_steps) prefix attention over the whole cache (generated slots not visible)."""
    return jnp.pad(layers.make_attn_mask(input_mask, ar_mask), ((0, 0), (0, 0), (0, max_decoding_steps)))


def prefill(config: Pi0FASTConfig, params: dict, obs: Observation, max_decoding_steps: int,
            hooks: Hooks = NO_HOOKS):
    """Run the prefix into a KV cache of ``P + max_decoding_steps`` slots. Returns (first logits (B, vocab),
    cache, layout, input_mask). As openpi, prefix attention spans the whole cache (its generated slots are still
    zero, which only fully masked query rows see)."""
    x, input_mask, ar = embed_inputs(config, params, obs, hooks)
    b, p = input_mask.shape
    num_slots = p + max_decoding_steps
    mask = prefill_mask(input_mask, ar, max_decoding_steps)
    layout = prefix_layout(input_mask)
    g = config.llm
    empty = jnp.zeros((g.depth, b, num_slots, g.num_kv_heads, g.head_dim), x.dtype)
    (out,), cache = gemma.forward(_llm(params), [x], layout.positions, mask, (g,), kv_cache=(empty, empty),
                                  cache_index=0, hooks=hooks, prefix_pass=True, streams=PREFIX_STREAM)
    last = jnp.take_along_axis(out, (layout.end - 1)[:, None, None], axis=1)[:, 0]
    return gemma.decode_logits(_llm(params), last), cache, layout, input_mask


def sample_actions(config: Pi0FASTConfig, params: dict, obs: Observation, *, rng: jax.Array | None = None,
                   max_decoding_steps: int | None = None, temperature: float | jax.Array = 0.0,
                   records: tuple[Record, ...] = (), interventions: tuple[Intervention, ...] = (),
                   knockouts: tuple[AttentionKnockout, ...] = ()) -> DecodeOutput:
    """KV-cached autoregressive decoding of action tokens (greedy at temperature 0, else sampled).

    Step ``s``: draw token ``s`` from the current logits (``rng, rng_step = split(rng)`` every step, as openpi),
    write it, run it through the model at cache slot ``P + s`` to get the next logits. Stops at end-of-sequence
    (``config.eos_stop``) or after ``max_decoding_steps``. Returns generated ids (not yet parsed into actions:
    see ``openpi.models.fast_prompt``), the number of executed steps and recordings; decoding-step recordings have a
    leading axis over the requested steps (zeros for steps after the stop).
    """
    m = _steps(config, max_decoding_steps)
    records, interventions, knockouts = tuple(records), tuple(interventions), tuple(knockouts)
    table = None
    if records or interventions or knockouts:
        table = hook_table(config, m)
        table.validate(records, interventions, knockouts, m)
    hooks = Hooks(records=records, interventions=interventions, knockouts=knockouts, table=table, num_steps=m)
    rng = jax.random.key(0) if rng is None else rng
    logits, cache, layout, input_mask = prefill(config, params, obs, m, hooks)
    recorded = dict(hooks.collected)
    b, p = input_mask.shape
    num_slots = p + m
    per_sample = config.eos_stop == "per_sample"

    def decode(core, step, step_hooks: Hooks):
        """One decoding step on the loop state (rng, logits, tokens, cache, done)."""
        rng, logits, tokens, cache, done = core
        rng, rng_step = jax.random.split(rng)
        logits = step_hooks("llm.logits", logits)
        token = _sample(logits, rng_step, temperature)
        if per_sample:
            token = jnp.where(done, 0, token)
            done = done | (token == config.eos_token)
        else:
            done = token == config.eos_token  # openpi: stop only when all samples emit EOS in the same step
        tokens = jax.lax.dynamic_update_index_in_dim(tokens, token, step, axis=1)
        x = gemma.embed_tokens(_llm(params), token[:, None], config.llm.width, jnp.dtype(config.dtype))
        positions = decode_position(config, layout, step)[:, None]
        mask = decode_mask(config, layout, input_mask, step, num_slots)
        (out,), cache = gemma.forward(_llm(params), [x], positions, mask, (config.llm,), kv_cache=cache,
                                      cache_index=p + step, hooks=step_hooks, query_start=p, streams=DECODE_STREAM)
        logits = gemma.decode_logits(_llm(params), out[:, 0])
        return (rng, logits, tokens, cache, done), step_hooks.collected

    core = (rng, logits, jnp.zeros((b, m), jnp.int32), cache, jnp.zeros((b,), bool))
    buffers, selected = _record_buffers(hooks, lambda c: decode(c, jnp.int32(0), hooks.for_step(jnp.int32(0)))[1],
                                        core, m)

    def body(state):
        step, core, buffers = state
        core, collected = decode(core, step, hooks.for_step(step))
        return step + 1, core, _write_step(buffers, collected, selected, step)

    def cond(state):
        step, core, _ = state
        return (step < m) & ~jnp.all(core[4])

    steps, core, buffers = jax.lax.while_loop(cond, body, (jnp.int32(0), core, buffers))
    recorded.update(buffers)
    return DecodeOutput(core[2], steps, recorded)


def _record_buffers(hooks: Hooks, one_step, core, num_steps: int):
    """Zero buffers (n_selected_steps, ...) for every decoding-step recording, shaped by tracing one step."""
    if not hooks.records:
        return {}, {}
    shapes = jax.eval_shape(one_step, core)
    selected = {name: resolve_steps(hooks.record_for(name).steps, num_steps) for name in shapes}
    buffers = {name: jnp.zeros((len(selected[name]),) + s.shape, s.dtype) for name, s in shapes.items()}
    return buffers, selected


def _write_step(buffers: dict, collected: dict, selected: dict, step: jax.Array) -> dict:
    """Store this step's recordings in the rows of the steps that were asked for (others untouched)."""
    out = {}
    for name, buf in buffers.items():
        hit = jnp.asarray(selected[name]) == step
        row = jnp.argmax(hit)
        value = jnp.where(jnp.any(hit), collected[name], buf[row])
        out[name] = jax.lax.dynamic_update_index_in_dim(buf, value, row, axis=0)
    return out
