"""LIBERO observation/action glue: request keys -> model inputs, model actions -> 7-D env actions."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from openpi.models.config import Pi0Config
from openpi.models.model import make_observation
from openpi.models.normalize import NormStats, normalize, unnormalize
from openpi.models.tokenizer import PromptTokenizer

IMAGE_KEY = "observation/image"
WRIST_KEY = "observation/wrist_image"
STATE_KEY = "observation/state"
PROMPT_KEY = "prompt"
STATE_DIM = 8
ACTION_DIM = 7


def _as_uint8_image(value, key: str) -> np.ndarray:
    img = np.asarray(value)
    if img.ndim != 3:
        raise ValueError(f"{key!r}: expected an image of shape (H, W, 3), got shape {img.shape}")
    if img.shape[0] == 3 and img.shape[-1] != 3:  # CHW -> HWC, as openpi's LIBERO inputs accept both
        img = np.transpose(img, (1, 2, 0))
    if img.shape[-1] != 3:
        raise ValueError(f"{key!r}: expected 3 colour channels last, got shape {img.shape}")
    if np.issubdtype(img.dtype, np.floating):
        if not np.isfinite(img).all():
            raise ValueError(f"{key!r}: image contains NaN or Inf")
        img = (np.clip(img, 0.0, 1.0) * 255).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise ValueError(f"{key!r}: expected dtype uint8 (or float in [0, 1]), got {img.dtype}")
    return img


@dataclasses.dataclass
class LiberoTransforms:
    """Mapping: agent view -> base_0_rgb, wrist -> left_wrist_0_rgb, right wrist zeros (masked) when the model has
    that slot (configs without it skip its always-masked tokens)."""

    config: Pi0Config
    tokenizer: PromptTokenizer
    norm_stats: dict[str, NormStats] | None = None
    quantile_norm: bool = False
    delta_actions: bool = False  # pi0_libero: model predicts deltas for the first 6 dims
    default_prompt: str | None = None

    def image_hw(self) -> tuple[int, int]:
        """(height, width) both cameras are resized to, with padding (square for the Pi0 family; a Diffusion Policy
        config may ask for another shape)."""
        return self.config.image_size, self.config.image_size

    def parse(self, obs: dict) -> tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Checked request -> (prompt, raw state (8,), normalised state (8,), agent view, wrist) with both images
        resized with padding to the model's size."""
        if not isinstance(obs, dict):
            raise TypeError(f"observation must be a dict, got {type(obs).__name__}")
        missing = [k for k in (IMAGE_KEY, WRIST_KEY, STATE_KEY) if k not in obs]
        if missing:
            raise KeyError(f"observation is missing key(s) {missing}; LIBERO policy expects "
                           f"{[IMAGE_KEY, WRIST_KEY, STATE_KEY, PROMPT_KEY]}")
        prompt = obs.get(PROMPT_KEY, self.default_prompt)
        if prompt is None:
            raise KeyError(f"observation has no {PROMPT_KEY!r} and the policy has no default prompt")
        if not isinstance(prompt, str):
            raise TypeError(f"{PROMPT_KEY!r} must be a string, got {type(prompt).__name__}")
        state = np.asarray(obs[STATE_KEY], np.float32).reshape(-1)
        if state.shape != (STATE_DIM,):
            raise ValueError(f"{STATE_KEY!r}: expected {STATE_DIM} floats (eef pos 3, axis-angle 3, gripper 2), "
                             f"got shape {np.asarray(obs[STATE_KEY]).shape}")
        if not np.isfinite(state).all():
            raise ValueError(f"{STATE_KEY!r} contains NaN or Inf")
        from openpi.shared.image_tools import resize_with_pad

        height, width = self.image_hw()
        base = resize_with_pad(_as_uint8_image(obs[IMAGE_KEY], IMAGE_KEY), height, width)
        wrist = resize_with_pad(_as_uint8_image(obs[WRIST_KEY], WRIST_KEY), height, width)
        if self.norm_stats is not None:
            with np.errstate(over="ignore", invalid="ignore"):
                state = normalize(state, self.norm_stats["state"], self.quantile_norm)
            if not np.isfinite(state).all():
                raise ValueError(f"{STATE_KEY!r} is out of range: it normalises to a non-finite value (max |state| "
                                 f"{float(np.max(np.abs(obs[STATE_KEY]))):.3g})")
        return prompt, np.asarray(obs[STATE_KEY], np.float32).reshape(-1), state, base, wrist

    def camera_inputs(self, base: np.ndarray, wrist: np.ndarray, pad_slots_valid: bool = False
                      ) -> tuple[dict[str, np.ndarray], dict[str, bool]]:
        """Agent view and wrist in the first two camera slots; further slots (the right wrist) zeros, masked out
        unless ``pad_slots_valid`` (openpi's Pi0-FAST LIBERO policy leaves them unmasked)."""
        keys = self.config.image_keys
        images, masks = {keys[0]: base, keys[1]: wrist}, {keys[0]: True, keys[1]: True}
        for key in keys[2:]:
            images[key], masks[key] = np.zeros_like(base), pad_slots_valid
        return images, masks

    def inputs(self, obs: dict) -> dict:
        prompt, raw_state, state, base, wrist = self.parse(obs)
        padded = np.zeros(self.config.action_dim, np.float32)
        padded[:STATE_DIM] = state
        tok = self.tokenizer.tokenize(prompt, state=state if self.config.discrete_state_input else None)
        images, masks = self.camera_inputs(base, wrist)
        return {
            "images": images,
            "image_masks": masks,
            "state": padded,
            "raw_state": raw_state,
            "tokenized_prompt": tok.ids,
            "tokenized_prompt_mask": tok.mask,
            "prompt_length": tok.length,
            "instruction": tok.instruction,
            "state_in_prompt": tok.state,
            "prompt": prompt,
        }

    def outputs(self, actions: np.ndarray, inputs: dict) -> np.ndarray:
        """(H, action_dim) model output -> (H, 7) env actions."""
        actions = np.asarray(actions, np.float32)
        if self.norm_stats is not None:
            actions = unnormalize(actions, self.norm_stats["actions"], self.quantile_norm)
        if self.delta_actions:
            actions = actions.copy()
            actions[..., :6] += inputs["raw_state"][:6]
        return actions[..., :ACTION_DIM]


def batch_observation(inputs: Sequence[dict]):
    """Outputs of ``LiberoTransforms.inputs`` for B observations -> one batched model ``Observation`` (serving
    stacks one, training a batch: the same code path, so training sees exactly what serving sends)."""
    keys = list(inputs[0]["images"])
    return make_observation({k: np.stack([x["images"][k] for x in inputs]) for k in keys},
                            {k: np.array([x["image_masks"][k] for x in inputs]) for k in keys},
                            np.stack([x["state"] for x in inputs]),
                            np.stack([x["tokenized_prompt"] for x in inputs]),
                            np.stack([x["tokenized_prompt_mask"] for x in inputs]))


def example_observation(prompt: str = "pick up the black bowl between the plate and the ramekin and place it on the "
                                      "plate", seed: int = 0, image_size: int = 256) -> dict:
    """A LIBERO request with random camera images and a zero state, for trying the API without a simulator.

    It carries the ``meta/*`` keys of a query (libero_spatial task 0, episode ``seed``, env step 0), so the
    policy's flow-matching noise is keyed by them and repeated calls give identical actions."""
    rng = np.random.default_rng(seed)
    return {IMAGE_KEY: rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8),
            WRIST_KEY: rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8),
            STATE_KEY: np.zeros(STATE_DIM, np.float32), PROMPT_KEY: prompt,
            "meta/suite": "libero_spatial", "meta/task_id": 0, "meta/episode": seed, "meta/env_step": 0}
