"""Check our model against a reference fixture produced by openpi's own code.

    python -m openpi.models.parity path/to/fixture.npz [--tolerance-tokens 1e-5] [--tolerance 1e-4]

The fixture uses the key layout of shared/fixtures/openpi_ref/*.npz: parameter paths without prefix, ``input/...``
and ``output/...`` arrays. The model family (Pi0, Pi0.5 or Pi0-FAST) and every size are read from the parameters.
Every ``output/...`` array is compared; one this tool cannot compute is reported as ``null`` and fails the run.
Prints a JSON report ``{output_name: max_abs_diff, ..., "tolerances": {...}, "ok": bool}``; exits 1 on failure.

Tolerances (float32 on CPU; openpi's own jit vs op-by-op spread is ~2e-6): ``--tolerance-tokens`` (1e-5) for image,
prefix/suffix/embedding tokens and Pi0.5's ``adarms_cond``; ``--tolerance`` (1e-4) for everything computed by the
language model (``suffix_out``, ``v_t``, ``loss``, ``sample_actions``, ``pre_logits``, ``logits``, ``token_nll``,
``step_logits``); exact equality for masks, positions, lengths and generated token ids (for booleans the report
gives the number of differing entries).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import tyro

from openpi.models import pi0
from openpi.models.config import _GEMMA_VARIANTS, _SIGLIP_VARIANTS, Pi0Config
from openpi.models.model import make_observation
from openpi.models.params_util import unflatten

TOKEN_OUTPUTS = ("image_tokens", "prefix_tokens", "suffix_tokens", "adarms_cond")


def _find_variant(table: dict, **want) -> str:
    for name, v in table.items():
        fields = dataclasses.asdict(v) if dataclasses.is_dataclass(v) else dict(zip(("width", "depth"), v))
        if all(fields[k] == val for k, val in want.items()):
            return name
    raise ValueError(f"no known variant with {want}")


def shared_variants(flat: dict[str, np.ndarray]) -> dict:
    """SigLIP variant, PaliGemma variant and vocabulary size from parameter shapes (all model families)."""
    try:
        img_w = flat["PaliGemma/img/embedding/kernel"].shape[-1]
        patch = flat["PaliGemma/img/embedding/kernel"].shape[0]
        img_depth = flat["PaliGemma/img/Transformer/encoderblock/LayerNorm_0/scale"].shape[0]
        llm_w = flat["PaliGemma/llm/layers/attn/q_einsum/w"].shape[2]
        depth = flat["PaliGemma/llm/layers/attn/q_einsum/w"].shape[0]
        vocab = flat["PaliGemma/llm/embedder/input_embedding"].shape[0]
    except KeyError as exc:
        raise KeyError(f"fixture lacks parameter {exc}; is this an openpi Pi0/Pi0.5/Pi0-FAST fixture?") from None
    return dict(siglip_variant=f"{_find_variant(_SIGLIP_VARIANTS, width=img_w, depth=img_depth)}/{patch}",
                paligemma_variant=_find_variant(_GEMMA_VARIANTS, width=llm_w, depth=depth), vocab_size=vocab)


def fixture_kind(flat: dict[str, np.ndarray]) -> str:
    """'pi0_fast' when the parameters have no action expert, else 'pi0' (Pi0 and Pi0.5 share one path)."""
    return "pi0" if "PaliGemma/llm/layers/attn/q_einsum_1/w" in flat else "pi0_fast"


def config_from_params(flat: dict[str, np.ndarray], inputs: dict[str, np.ndarray]) -> Pi0Config:
    """Infer the Pi0 / Pi0.5 config from parameter shapes (and horizon / prompt length from the inputs)."""
    try:
        ex_w = flat["PaliGemma/llm/layers/attn/q_einsum_1/w"].shape[2]
        depth = flat["PaliGemma/llm/layers/attn/q_einsum_1/w"].shape[0]
        action_dim = flat["action_in_proj/kernel"].shape[0]
    except KeyError as exc:
        raise KeyError(f"fixture lacks parameter {exc}; is this an openpi Pi0/Pi0.5 fixture?") from None
    pi05 = "time_mlp_in/kernel" in flat
    return Pi0Config(
        pi05=pi05, **shared_variants(flat),
        action_expert_variant=_find_variant(_GEMMA_VARIANTS, width=ex_w, depth=depth),
        dtype="float32", action_dim=action_dim,
        action_horizon=inputs["input/noise"].shape[1], max_token_len=inputs["input/tokenized_prompt"].shape[1],
        discrete_state_input=pi05)


def pi0_outputs(flat: dict[str, np.ndarray], inputs: dict[str, np.ndarray], source: str) -> tuple[str, dict]:
    """Our values of every output a Pi0 / Pi0.5 fixture may hold. Returns (model type, outputs)."""
    for key in ("input/noise", "input/tokenized_prompt", "input/state", "input/time", "input/x_t"):
        if key not in inputs:
            raise KeyError(f"{source}: missing {key!r}")
    config = config_from_params(flat, inputs)
    params = unflatten({k: jnp.asarray(v) for k, v in flat.items()})
    cams = config.image_keys
    obs = make_observation({k: inputs[f"input/image_uint8/{k}"] for k in cams},
                           {k: inputs[f"input/image_mask/{k}"] for k in cams}, inputs["input/state"],
                           inputs["input/tokenized_prompt"], inputs["input/tokenized_prompt_mask"])
    x_t, time, noise = (jnp.asarray(inputs[k]) for k in ("input/x_t", "input/time", "input/noise"))
    ours: dict[str, np.ndarray] = {}

    @jax.jit
    def forward(params, obs):
        from openpi.models import siglip
        imgs = {k: siglip.encode(params["PaliGemma"]["img"], obs.images[k], config.siglip, jnp.float32)
                for k in cams}
        prefix = pi0.embed_prefix(config, params, obs)
        suffix = pi0.embed_suffix(config, params, obs, x_t, time)
        suffix_out, v_t = pi0.joint_forward(config, params, obs, x_t, time)
        return imgs, prefix, suffix, suffix_out, v_t

    imgs, prefix, suffix, suffix_out, v_t = forward(params, obs)
    for k in cams:
        ours[f"image_tokens/{k}"] = imgs[k]
    ours.update(prefix_tokens=prefix[0], prefix_input_mask=prefix[1], prefix_ar_mask=prefix[2],
                suffix_tokens=suffix[0], suffix_input_mask=suffix[1], suffix_ar_mask=suffix[2],
                suffix_out=suffix_out, v_t=v_t)
    if config.pi05:  # the conditioning vector of the action expert's adaptive norms
        ours["adarms_cond"] = suffix[3]
    if "input/actions" in inputs:
        actions = jnp.asarray(inputs["input/actions"])
        ours["u_t"] = noise - actions
        ours["loss"] = jax.jit(lambda p, o: pi0.compute_loss(config, p, o, actions, noise=noise, time=time))(
            params, obs)
    num_steps = int(inputs.get("input/num_steps", 10))
    ours["sample_actions"] = jax.jit(lambda p, o: pi0.sample_actions(config, p, o, noise, num_steps=num_steps)[0])(
        params, obs)
    return config.model_type, ours


def pi0_tolerance(name: str, tol_tokens: float, tol: float) -> float:
    return tol_tokens if name.startswith(TOKEN_OUTPUTS) else tol


def compare(outputs: dict[str, np.ndarray], ours: dict, tolerance) -> tuple[dict, bool]:
    """max |diff| per reference output (count of differing entries for booleans); None for one we lack."""
    report: dict = {}
    ok = True
    for name, ref in sorted(outputs.items()):
        if name not in ours:
            report[name] = None  # an output we do not know how to compute: reported, not silently passed
            ok = False
            continue
        mine = np.asarray(ours[name])
        if mine.shape != ref.shape:
            report[name] = f"shape {mine.shape} != reference {ref.shape}"
            ok = False
            continue
        if ref.dtype == bool:
            diff = float(np.sum(mine != ref))
            ok &= diff == 0
        else:
            diff = float(np.max(np.abs(mine.astype(np.float64) - ref))) if ref.size else 0.0
            ok &= diff <= tolerance(name)
        report[name] = diff
    return report, bool(ok)


def run_parity(path: pathlib.Path, tol_tokens: float = 1e-5, tol: float = 1e-4) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"fixture {path} not found")
    z = np.load(path)
    flat = {k: z[k] for k in z.files if not k.startswith(("input/", "output/"))}
    inputs = {k: z[k] for k in z.files if k.startswith("input/")}
    outputs = {k[len("output/"):]: z[k] for k in z.files if k.startswith("output/")}
    if fixture_kind(flat) == "pi0_fast":
        from openpi.models import parity_fast
        model_type, ours = parity_fast.fast_outputs(flat, inputs, str(path))
        tolerance = lambda name: parity_fast.tolerance(name, tol_tokens, tol)  # noqa: E731
    else:
        model_type, ours = pi0_outputs(flat, inputs, str(path))
        tolerance = lambda name: pi0_tolerance(name, tol_tokens, tol)  # noqa: E731
    diffs, ok = compare(outputs, ours, tolerance)
    report: dict = {"fixture": str(path), "model": model_type, **diffs}
    report["tolerances"] = {name: 0.0 if ref.dtype == bool else tolerance(name)
                            for name, ref in sorted(outputs.items())}
    report["ok"] = ok
    return report


@dataclasses.dataclass
class Args:
    fixture: tyro.conf.Positional[pathlib.Path]
    tolerance_tokens: float = 1e-5
    """max |diff| for image/prefix/suffix/embedding tokens and adarms_cond"""
    tolerance: float = 1e-4
    """max |diff| for language-model outputs (suffix_out, v_t, loss, sample_actions, logits, step_logits, ...)"""


def main() -> None:
    args = tyro.cli(Args)
    report = run_parity(args.fixture, args.tolerance_tokens, args.tolerance)
    print(json.dumps(report, indent=2))
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
