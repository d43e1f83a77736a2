"""Pi0-FAST half of the parity tool: our value of every output of shared/fixtures/openpi_ref/pi0_fast_tiny.npz.

Run through ``python -m openpi.models.parity FIXTURE.npz`` (which dispatches here on the parameter tree). Outputs
openpi stores in its right-aligned cache order (``sample/aligned_input_mask``, ``sample/prefix_positions``,
``sample/prefix_attn_mask``) are our model's own arrays rolled into that order with
:func:`openpi.models.pi0_fast.align_like_openpi`; everything else is compared as computed.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from openpi.models import layers, pi0_fast, siglip
from openpi.models.config import Pi0FASTConfig
from openpi.models.hooks import Record
from openpi.models.model import make_fast_observation
from openpi.models.params_util import unflatten

TOKEN_OUTPUTS = ("image_tokens/", "embed_tokens")
EXACT_OUTPUTS = ("embed_ar_mask", "positions", "sample_tokens", "sample_num_steps", "sample/prefill_len",
                 "sample/prefix_start", "sample/prefix_positions", "sample/decode_positions",
                 "sample_tokens_all_images_valid", "temperature_sampling/sample_tokens")
MASK_KEYS = ("tokenized_prompt", "tokenized_prompt_mask", "token_ar_mask", "token_loss_mask")


def tolerance(name: str, tol_tokens: float, tol: float) -> float:
    """Image/embedding tokens: tol_tokens; ids, positions, lengths: 0; language-model outputs: tol."""
    if name in EXACT_OUTPUTS:
        return 0.0
    return tol_tokens if name.startswith(TOKEN_OUTPUTS) else tol


def config_from_fixture(flat: dict[str, np.ndarray], inputs: dict[str, np.ndarray]) -> Pi0FASTConfig:
    """Sizes from the parameter shapes, prompt length and decoding steps from the inputs (float32 compute). Action
    dim and horizon do not enter the model; they keep the config defaults."""
    from openpi.models.parity import shared_variants
    return Pi0FASTConfig(**shared_variants(flat), dtype="float32",
                         max_token_len=inputs["input/tokenized_prompt"].shape[1],
                         max_decoding_steps=int(inputs.get("input/max_decoding_steps", 256)))


def _observation(config: Pi0FASTConfig, inputs: dict, prefix: str, all_images_valid: bool = False):
    cams = config.image_keys
    masks = {k: inputs[f"input/image_mask/{k}"] for k in cams}
    if all_images_valid:
        masks = {k: np.ones_like(v) for k, v in masks.items()}
    return make_fast_observation({k: inputs[f"input/image_uint8/{k}"] for k in cams}, masks,
                                 *(inputs[f"input/{prefix}{k}"] for k in MASK_KEYS))


def fast_outputs(flat: dict[str, np.ndarray], inputs: dict[str, np.ndarray], source: str) -> tuple[str, dict]:
    """Our values of every output a Pi0-FAST fixture may hold. Returns (model type, outputs)."""
    for key in ("input/tokenized_prompt", "input/infer/tokenized_prompt", "input/sample_rng_key"):
        if key not in inputs:
            raise KeyError(f"{source}: missing {key!r}")
    config = config_from_fixture(flat, inputs)
    params = unflatten({k: jnp.asarray(v) for k, v in flat.items()})
    train = _observation(config, inputs, "")
    infer = _observation(config, inputs, "infer/")
    m = config.max_decoding_steps
    ours: dict[str, np.ndarray] = {}

    @jax.jit
    def train_outputs(params, obs):
        imgs = {k: siglip.encode(params["PaliGemma"]["img"], obs.images[k], config.siglip, jnp.float32)
                for k in config.image_keys}
        tokens, input_mask, ar = pi0_fast.embed_inputs(config, params, obs)
        pre_logits, logits = pi0_fast.forward(config, params, obs)
        nll = pi0_fast.token_nll(pi0_fast.next_token_logits(config, params, obs), obs.tokenized_prompt[:, 1:])
        return imgs, tokens, input_mask, ar, pre_logits, logits, nll, pi0_fast.compute_loss(config, params, obs)

    imgs, tokens, input_mask, ar, pre_logits, logits, nll, loss = train_outputs(params, train)
    ours.update({f"image_tokens/{k}": v for k, v in imgs.items()})
    ours.update(embed_tokens=tokens, embed_input_mask=input_mask, embed_ar_mask=ar,
                attn_mask=layers.make_attn_mask(input_mask, ar),
                positions=pi0_fast.training_positions(1, tokens.shape[1])[0],
                pre_logits=pre_logits, logits=logits, token_nll=nll, loss=loss)

    @jax.jit
    def layout_outputs(params, obs):
        _, input_mask, ar = pi0_fast.embed_inputs(config, params, obs)
        layout = pi0_fast.prefix_layout(input_mask)
        p = input_mask.shape[1]
        mask = pi0_fast.prefill_mask(input_mask, ar, m)
        aligned_mask = jnp.concatenate([pi0_fast.align_like_openpi(mask[:, :, :p], layout, axes=(1, 2)),
                                        mask[:, :, p:]], axis=-1)
        steps = jnp.arange(m)
        decode_positions = jax.vmap(lambda s: pi0_fast.decode_position(config, layout, s), out_axes=1)(steps)
        return {"sample/prefill_len": layout.prefill_len, "sample/prefix_start": p - layout.prefill_len,
                "sample/aligned_input_mask": pi0_fast.align_like_openpi(input_mask, layout),
                "sample/prefix_positions": pi0_fast.align_like_openpi(layout.positions, layout),
                "sample/prefix_attn_mask": aligned_mask, "sample/decode_positions": decode_positions}

    ours.update(layout_outputs(params, infer))

    decode = jax.jit(lambda params, obs, rng, temperature: pi0_fast.sample_actions(
        config, params, obs, rng=rng, temperature=temperature, records=(Record("llm.logits"),)))
    rng = jax.random.wrap_key_data(jnp.asarray(inputs["input/sample_rng_key"], jnp.uint32))
    greedy_t = jnp.float32(inputs.get("input/temperature", 0.0))
    sampled_t = jnp.float32(inputs.get("input/temperature_sampling/temperature", 1.0))
    for prefix, tokens_key, obs, temperature in (
            ("sample/", "sample_tokens", infer, greedy_t),
            ("sample_all_images_valid/", "sample_tokens_all_images_valid",
             _observation(config, inputs, "infer/", all_images_valid=True), greedy_t),
            ("temperature_sampling/", "temperature_sampling/sample_tokens", infer, sampled_t)):
        out = decode(params, obs, rng, temperature)
        ours[tokens_key] = np.asarray(out.tokens).astype(np.float32)  # openpi returns float32 ids
        ours[f"{prefix}step_logits"] = jnp.swapaxes(out.recordings["llm.logits"], 0, 1)
        if prefix == "sample/":
            ours["sample_num_steps"] = out.num_steps
    return config.model_type, ours
