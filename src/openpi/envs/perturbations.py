"""Seeded perturbations of a LIBERO evaluation: of the prompt, of the images the policy sees, of its actions/scene.

Why: interpretability questions ("does the policy read the instruction?", "is it looking at the object?") are
answered by comparing rollouts under controlled changes. Every perturbation here is deterministic given
``(seed, suite, task_id, episode)`` -- independent of sharding, resume order and of the other perturbations --
and describes itself as a JSON-able dict that goes into the episode record.

Prompt modes: ``original``, ``empty``, ``shuffle`` (word order), ``other_task`` (another task's instruction from
the same suite), ``synonym`` (word/phrase synonyms), ``opposite`` (spatial/state words swapped: left<->right,
open<->close, turn on<->turn off, ...), ``custom`` (a given text).
Visual: rotation (degrees, counter-clockwise, about the image centre) and integer translation (pixels), applied to
the 224x224 images sent to the policy; masks get the identical transform with nearest sampling.
Policy/scene: replace each executed action by a random one with probability ``p``; shift an object's position
before the episode starts.
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from PIL import Image

PromptMode = Literal["original", "empty", "shuffle", "other_task", "synonym", "opposite", "custom"]
PROMPT_MODES: tuple[str, ...] = ("original", "empty", "shuffle", "other_task", "synonym", "opposite", "custom")
VISUAL_CAMERAS = ("agentview", "wrist")

# Synonyms for the vocabulary of LIBERO instructions (phrases first: longer keys win).
SYNONYMS: dict[str, tuple[str, ...]] = {
    "pick up": ("lift", "grab", "take"),
    "place": ("put", "set"),
    "put": ("place", "set"),
    "push": ("shove", "slide"),
    "turn on": ("switch on",),
    "turn off": ("switch off",),
    "open": ("pull open",),
    "close": ("shut",),
    "bowl": ("dish",),
    "plate": ("platter",),
    "basket": ("bin",),
    "stove": ("cooktop",),
    "cabinet": ("cupboard",),
    "drawer": ("compartment",),
    "mug": ("cup",),
    "next to": ("beside",),
    "on top of": ("atop",),
    "into": ("inside",),
    "black": ("dark",),
}

# Opposites: spatial relations and object states.
OPPOSITES: dict[str, str] = {
    "left": "right",
    "right": "left",
    "top": "bottom",
    "bottom": "top",
    "front": "back",
    "back": "front",
    "in front of": "behind",
    "behind": "in front of",
    "open": "close",
    "close": "open",
    "turn on": "turn off",
    "turn off": "turn on",
    "on top of": "under",
    "on": "under",
    "under": "on",
    "into": "out of",
    "inside": "outside",
    "outside": "inside",
    "above": "below",
    "below": "above",
}


def _key_part(value: int | str) -> int:
    return value if isinstance(value, int) else zlib.crc32(str(value).encode())


def derive_rng(seed: int, *keys: int | str) -> np.random.Generator:
    """Independent, reproducible generator for one (seed, keys...) combination (strings hashed stably)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *(_key_part(k) for k in keys)]))


# --------------------------------------------------------------------------------------------------
# Prompt
# --------------------------------------------------------------------------------------------------


def _phrase_regex(keys: Sequence[str]) -> re.Pattern[str]:
    alternatives = sorted(keys, key=len, reverse=True)
    return re.compile(r"\b(" + "|".join(re.escape(k) for k in alternatives) + r")\b", re.IGNORECASE)


_SYNONYM_RE = _phrase_regex(list(SYNONYMS))
_OPPOSITE_RE = _phrase_regex(list(OPPOSITES))


def _substitute(prompt: str, pattern: re.Pattern[str], choose) -> tuple[str, list[dict[str, str]]]:
    replaced: list[dict[str, str]] = []

    def repl(m: re.Match[str]) -> str:
        new = choose(m.group(0).lower())
        replaced.append({"from": m.group(0), "to": new})
        return new

    return pattern.sub(repl, prompt), replaced


def perturb_prompt(
    prompt: str,
    mode: str,
    rng: np.random.Generator,
    *,
    other_prompts: Sequence[str] = (),
    custom: str | None = None,
) -> tuple[str, dict[str, Any]]:
    """Return (new prompt, JSON-able description). The description always holds mode, original and new text."""
    if mode not in PROMPT_MODES:
        raise ValueError(f"unknown prompt mode {mode!r}; expected one of {PROMPT_MODES}")
    info: dict[str, Any] = {"kind": "prompt", "mode": mode, "original": prompt}
    if mode == "original":
        new = prompt
    elif mode == "empty":
        new = ""
    elif mode == "custom":
        if custom is None:
            raise ValueError("prompt mode 'custom' needs a custom prompt text")
        new = custom
    elif mode == "shuffle":
        words = prompt.split()
        order = np.arange(len(words))
        distinct = len(set(words)) > 1
        for _ in range(100):
            order = rng.permutation(len(words))
            if not distinct or [words[i] for i in order] != words:
                break
        new = " ".join(words[i] for i in order)
        info["permutation"] = [int(i) for i in order]
    elif mode == "other_task":
        candidates = sorted({p for p in other_prompts if p != prompt})
        if not candidates:
            raise ValueError("prompt mode 'other_task' needs at least one other task instruction in the suite")
        new = candidates[int(rng.integers(len(candidates)))]
    elif mode == "synonym":
        new, info["replacements"] = _substitute(
            prompt, _SYNONYM_RE, lambda key: str(SYNONYMS[key][int(rng.integers(len(SYNONYMS[key])))])
        )
    else:  # opposite
        new, info["replacements"] = _substitute(prompt, _OPPOSITE_RE, lambda key: OPPOSITES[key])
    info["prompt"] = new
    info["changed"] = new != prompt
    if mode in ("shuffle", "synonym", "opposite") and not info["changed"]:
        info["warning"] = f"prompt mode {mode!r} left the prompt unchanged"
    return new, info


# --------------------------------------------------------------------------------------------------
# Visual
# --------------------------------------------------------------------------------------------------


def _shift(arr: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """Translate by whole pixels (right by dx, down by dy), zero fill."""
    out = np.zeros_like(arr)
    h, w = arr.shape[:2]
    if abs(dx) >= w or abs(dy) >= h:
        return out
    src_y = slice(max(0, -dy), h - max(0, dy))
    dst_y = slice(max(0, dy), h - max(0, -dy))
    src_x = slice(max(0, -dx), w - max(0, dx))
    dst_x = slice(max(0, dx), w - max(0, -dx))
    out[dst_y, dst_x] = arr[src_y, src_x]
    return out


def _rotate(arr: np.ndarray, degrees: float, nearest: bool) -> np.ndarray:
    if degrees == 0:
        return arr
    if nearest:
        pil = Image.fromarray(np.ascontiguousarray(arr.astype(np.int32)))
        out = pil.rotate(degrees, resample=Image.Resampling.NEAREST, fillcolor=0)
        return np.asarray(out).astype(arr.dtype)
    pil = Image.fromarray(np.ascontiguousarray(arr))
    return np.asarray(pil.rotate(degrees, resample=Image.Resampling.BILINEAR, fillcolor=(0,) * len(pil.getbands())))


@dataclasses.dataclass(frozen=True)
class VisualPerturbation:
    """Rotate then translate the chosen cameras' images (and masks, identically, nearest sampling)."""

    rotate_deg: float = 0.0
    translate_px: tuple[int, int] = (0, 0)  # (dx right, dy down)
    cameras: tuple[str, ...] = ("agentview",)

    def __post_init__(self) -> None:
        unknown = [c for c in self.cameras if c not in VISUAL_CAMERAS]
        if unknown:
            raise ValueError(f"unknown camera(s) {unknown} for visual perturbation; expected {VISUAL_CAMERAS}")

    @property
    def is_identity(self) -> bool:
        return self.rotate_deg == 0 and tuple(self.translate_px) == (0, 0)

    def applies_to(self, camera: str) -> bool:
        return camera in self.cameras and not self.is_identity

    def apply(self, image: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Transform an HxWx3 uint8 image and optionally its HxW integer mask with the same geometry."""
        if self.is_identity:
            return image, mask
        dx, dy = (int(v) for v in self.translate_px)
        image = _shift(_rotate(image, self.rotate_deg, nearest=False), dx, dy)
        if mask is not None:
            mask = _shift(_rotate(mask, self.rotate_deg, nearest=True), dx, dy)
        return image, mask

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "visual",
            "rotate_deg": float(self.rotate_deg),
            "translate_px": [int(v) for v in self.translate_px],
            "cameras": list(self.cameras),
        }


def sample_visual(
    rotate_deg: float,
    translate_px: tuple[int, int],
    cameras: Sequence[str],
    rng: np.random.Generator,
    random: bool,
) -> VisualPerturbation:
    """Fixed perturbation, or (``random``) rotation uniform in +-rotate_deg and translation uniform in +-px."""
    if not random:
        return VisualPerturbation(float(rotate_deg), (int(translate_px[0]), int(translate_px[1])), tuple(cameras))
    angle = float(rng.uniform(-abs(rotate_deg), abs(rotate_deg))) if rotate_deg else 0.0
    dx = int(rng.integers(-abs(translate_px[0]), abs(translate_px[0]) + 1))
    dy = int(rng.integers(-abs(translate_px[1]), abs(translate_px[1]) + 1))
    return VisualPerturbation(round(angle, 4), (dx, dy), tuple(cameras))


# --------------------------------------------------------------------------------------------------
# Policy / scene
# --------------------------------------------------------------------------------------------------


class RandomActionPerturbation:
    """With probability ``prob`` per executed step, replace the policy's action by a uniformly random one."""

    def __init__(self, prob: float, rng: np.random.Generator) -> None:
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"random action probability must be in [0, 1], got {prob}")
        self.prob = prob
        self._rng = rng
        self.replaced_steps: list[int] = []

    def __call__(self, action: np.ndarray, env_step: int) -> tuple[np.ndarray, bool]:
        # Always draw, so which steps are replaced does not depend on the policy's actions.
        draw = self._rng.random()
        random_action = np.concatenate([self._rng.uniform(-1.0, 1.0, 6), [self._rng.choice([-1.0, 1.0])]])
        if self.prob > 0 and draw < self.prob:
            self.replaced_steps.append(int(env_step))
            return random_action, True
        return np.asarray(action, dtype=np.float64), False

    def describe(self) -> dict[str, Any]:
        return {"kind": "random_actions", "prob": float(self.prob), "replaced_steps": list(self.replaced_steps)}


def sample_object_shift(max_shift_m: float, rng: np.random.Generator) -> tuple[float, float, float]:
    """Horizontal shift with each of x, y uniform in +-max_shift_m (z unchanged)."""
    dx, dy = rng.uniform(-abs(max_shift_m), abs(max_shift_m), 2)
    return (round(float(dx), 6), round(float(dy), 6), 0.0)


def shift_object(raw_env: Any, name: str, delta_xyz: Sequence[float]) -> dict[str, Any]:
    """Move a free-jointed LIBERO object by ``delta_xyz`` metres in the simulator (call before settling).

    ``raw_env`` is LIBERO's ``OffScreenRenderEnv``. Fixtures (cabinets, stoves...) have no free joint and are refused.
    """
    inner = raw_env.env
    objects = getattr(inner, "objects_dict", {})
    if name not in objects:
        raise ValueError(f"cannot shift {name!r}: not a movable object of this task (movable: {sorted(objects)})")
    joints = list(objects[name].joints)
    if not joints:
        raise ValueError(f"cannot shift {name!r}: it has no joint (a fixed object)")
    joint = joints[0]
    sim = inner.sim
    qpos = np.array(sim.data.get_joint_qpos(joint), dtype=np.float64)
    if qpos.shape != (7,):
        raise ValueError(f"cannot shift {name!r}: joint {joint!r} is not a free joint (qpos shape {qpos.shape})")
    before = qpos[:3].copy()
    qpos[:3] += np.asarray(delta_xyz, dtype=np.float64)
    sim.data.set_joint_qpos(joint, qpos)
    sim.forward()
    return {
        "kind": "object_shift",
        "object": name,
        "delta_m": [float(v) for v in delta_xyz],
        "position_before": [float(v) for v in before],
        "position_after": [float(v) for v in qpos[:3]],
    }


# --------------------------------------------------------------------------------------------------
# Configuration and per-episode plan
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PerturbationConfig:
    """Perturbation flags of an evaluation run (all off by default)."""

    prompt_mode: PromptMode = "original"
    """How the instruction is changed (see module docstring)."""
    custom_prompt: str | None = None
    """Text for prompt_mode=custom."""
    rotate_deg: float = 0.0
    """Rotate the policy's images by this many degrees (or uniformly within +-this when visual_random)."""
    translate_px: tuple[int, int] = (0, 0)
    """Translate the policy's images by (dx, dy) pixels (or uniformly within +-these when visual_random)."""
    visual_random: bool = False
    """Sample rotation/translation per episode instead of using fixed values."""
    visual_cameras: tuple[str, ...] = ("agentview",)
    """Which cameras the visual perturbation applies to: agentview and/or wrist."""
    random_action_prob: float = 0.0
    """Probability of replacing each executed action by a random one."""
    object_shift_m: float = 0.0
    """Shift an object horizontally by up to this many metres (uniform in +-, per episode) before settling."""
    object_shift_name: str | None = None
    """Object to shift; default: the first object of interest that can move."""

    def validate(self) -> None:
        if self.prompt_mode not in PROMPT_MODES:
            raise ValueError(f"unknown prompt mode {self.prompt_mode!r}; expected one of {PROMPT_MODES}")
        if self.prompt_mode == "custom" and self.custom_prompt is None:
            raise ValueError("prompt_mode=custom needs --perturb.custom-prompt")
        if not 0.0 <= self.random_action_prob <= 1.0:
            raise ValueError(f"random_action_prob must be in [0, 1], got {self.random_action_prob}")
        if len(self.translate_px) != 2:
            raise ValueError(f"translate_px must be (dx, dy), got {self.translate_px}")
        VisualPerturbation(self.rotate_deg, tuple(self.translate_px), tuple(self.visual_cameras))
        if self.object_shift_m < 0:
            raise ValueError(f"object_shift_m must be >= 0, got {self.object_shift_m}")

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["translate_px"] = list(self.translate_px)
        d["visual_cameras"] = list(self.visual_cameras)
        return d


@dataclasses.dataclass
class EpisodePerturbation:
    """The concrete perturbations of one episode, drawn from a config and (seed, suite, task, episode)."""

    prompt: str
    prompt_info: dict[str, Any]
    visual: VisualPerturbation
    random_actions: RandomActionPerturbation
    object_shift: tuple[float, float, float] | None
    object_shift_name: str | None
    object_shift_info: dict[str, Any] | None = None

    def apply_object_shift(self, raw_env: Any, movable_candidates: Sequence[str]) -> dict[str, Any] | None:
        """Apply the planned object shift (if any) to the simulator; returns its description."""
        if self.object_shift is None:
            return None
        name = self.object_shift_name
        if name is None:
            movable = set(getattr(raw_env.env, "objects_dict", {}))
            names = [c for c in movable_candidates if c in movable]
            if not names:
                raise ValueError(
                    f"object shift requested but none of {list(movable_candidates)} can move; "
                    f"set object_shift_name to one of {sorted(movable)}"
                )
            name = names[0]
        self.object_shift_info = shift_object(raw_env, name, self.object_shift)
        return self.object_shift_info

    def describe(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt_info,
            "visual": self.visual.describe(),
            "random_actions": self.random_actions.describe(),
            "object_shift": self.object_shift_info
            if self.object_shift_info is not None
            else (None if self.object_shift is None else {"kind": "object_shift", "planned_delta_m": list(self.object_shift)}),
        }


def plan_episode(
    cfg: PerturbationConfig,
    *,
    seed: int,
    suite: str,
    task_id: int,
    episode: int,
    prompt: str,
    other_prompts: Sequence[str] = (),
) -> EpisodePerturbation:
    """Draw every perturbation of one episode from its own generator keyed by (seed, suite, task, episode, kind)."""
    cfg.validate()
    key = (seed, suite, task_id, episode)
    new_prompt, prompt_info = perturb_prompt(
        prompt,
        cfg.prompt_mode,
        derive_rng(*key, "prompt"),
        other_prompts=other_prompts,
        custom=cfg.custom_prompt,
    )
    visual = sample_visual(
        cfg.rotate_deg, tuple(cfg.translate_px), cfg.visual_cameras, derive_rng(*key, "visual"), cfg.visual_random
    )
    random_actions = RandomActionPerturbation(cfg.random_action_prob, derive_rng(*key, "random_actions"))
    shift = sample_object_shift(cfg.object_shift_m, derive_rng(*key, "object_shift")) if cfg.object_shift_m > 0 else None
    return EpisodePerturbation(new_prompt, prompt_info, visual, random_actions, shift, cfg.object_shift_name)
