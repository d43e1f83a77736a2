"""LeRobot's Diffusion Policy behind the same Policy interface as Pi0: LIBERO requests in, action chunks out.

``infer``, ``infer_batch``, ``run_with_cache``, ``hooks(...)``, the store recorder and the websocket server are
:class:`~openpi.policies.policy.Policy`'s; this module plugs the model in through ``_call_model`` and
``_span_table`` (as Pi0-FAST does) and adds what a Diffusion Policy needs beyond one observation.

**Observation history, server-side.** The model conditions on the last ``n_obs_steps`` observations, while a
LIBERO request carries one. :class:`ObservationHistory` keeps, per episode, the last ``n_obs_steps`` *queried*
frames: one per request, i.e. with the LIBERO client (one request every ``replan_steps`` env steps) frames
``replan_steps`` env steps apart, not consecutive env steps as in LeRobot's own loop (which feeds every step to
``select_action``). A policy trained for serving here must see the same spacing in training (history frames
``replan_steps`` apart); one trained on consecutive frames sees a wider gap than it learnt.

- *Key*: ``(run_id, suite, task_id, episode, attempt)`` from the request's ``meta/*`` when it has suite, task id
  and episode (missing run id / attempt count as ''); otherwise the websocket server's ``meta/connection_id``;
  otherwise ``meta/run_id``; otherwise one shared in-process stream.
- *Position*: ``meta/env_step`` (else the server's ``meta/request_index``).
- *Reset*: a key not seen before, a position of 0, or a position below the last one starts a new history, filled
  by repeating its first frame (as LeRobot's ``select_action`` after ``reset()``). A position *equal* to the last
  one replaces the newest frame instead of appending (a repeated query, e.g. ``run_with_cache`` on the request just
  answered, gets the same chunk). Requests without a position always append; ``reset_history()`` clears them.
- *Memory*: at most ``max_histories`` episodes are kept, least recently queried dropped first. A dropped episode
  that comes back mid-episode restarts from its current frame, and the reply says so (``obs_history.reset``).

Every reply carries ``obs_history = {"positions": [...], "reset": bool}``: the env steps of the frames the chunk
was conditioned on, oldest first (repeats included).

**Randomness.** The initial sample x_T and, for DDPM, every denoising step's variance noise are drawn together
from a seed keyed by the request's ``meta/*`` (``NOISE_KEY_FIELDS``) and the policy seed, so a query gets the same
chunk in any run, order or batch; keyless requests draw from one stream per policy. An explicit ``noise`` is
(1 + S, horizon, action_dim): x_T, then the S = ``num_steps`` DDPM step noises (S = 0 for DDIM, where (horizon,
action_dim) is accepted too).

**Inputs and outputs.** The agent view and the wrist image are resized with padding to the config's (H, W) (as
Pi0's LIBERO transforms do) and mapped to the config's two cameras by name (:func:`libero_camera_keys`); the
8-D state is ``observation.state``; the prompt is unused (a Diffusion Policy has no language input). Actions are
the ``n_action_steps`` executed actions of the chunk, unnormalised, (n_action_steps, 7).

**Recordings.** Hook points are the model's (``openpi.models.diffusion.model.hook_points``, HOOKS.md): encoder
sites one row per request with the ``obs_step`` axis whole (keypoints / spatial-softmax attention over the
feature-map grid of each history frame), per-step sites (UNet, x_t, predicted x0) one row per recorded denoising
step (``denoise_step`` key). Rows are keyed per request like Pi0's (run, suite, task, episode, attempt, env step);
``token_index`` is -1 and ``span`` '' (no token sequence). The span table of a request (:func:`dp_span_table`) has
no spans; it records the history positions, the denoising timesteps and each camera's attention grid, which the
store also keeps in the site info of ``enc.<cam>.attn`` / ``enc.<cam>.kp_logits`` (``attention_grid``).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import pathlib
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from openpi.models.diffusion import model as dp
from openpi.models.diffusion import schedulers
from openpi.models.diffusion.config import ACTION, OBS_STATE, DiffusionConfig, load_config
from openpi.models.diffusion.normalize import Normalizer
from openpi.models.diffusion.policy import DiffusionPolicyModel
from openpi.models.hooks import AttentionKnockout, HookRequest, HookTable, Intervention, Record
from openpi.policies.libero_policy import ACTION_DIM, STATE_DIM, LiberoTransforms
from openpi.policies.policy import Policy

logger = logging.getLogger(__name__)

# Hook-name forms (model.camera_name) of a LeRobot image key that hold LIBERO's agent view / wrist camera:
# LeRobot's LIBERO datasets use observation.images.image / .wrist_image (or observation.image / .wrist_image),
# LeRobot's LIBERO env observation.images.image / .image2.
AGENT_VIEW_CAMERAS = ("image", "agentview", "agentview_image")
WRIST_CAMERAS = ("wrist_image", "image2", "wrist", "eye_in_hand", "robot0_eye_in_hand_image")
DEFAULT_MAX_HISTORIES = 256
HISTORY_KEY_FIELDS = ("suite", "task_id", "episode")


class ConfigMismatchError(ValueError):
    """A Diffusion Policy whose inputs or outputs do not match what a LIBERO request carries."""


def libero_camera_keys(config: DiffusionConfig) -> tuple[str, str]:
    """(agent-view key, wrist key) of a config, after checking it takes exactly LIBERO's inputs and outputs."""
    found = {k: f"{f.type} {list(f.shape)}" for k, f in config.input_features}
    problems = []
    if config.num_cameras != 2:
        problems.append(f"{config.num_cameras} camera(s) {list(config.image_keys)}, expected 2 (agent view, wrist)")
    if config.state_dim != STATE_DIM:
        problems.append(f"{OBS_STATE} of {config.state_dim} values, expected {STATE_DIM} (eef pos 3, axis-angle 3, "
                        "gripper 2)")
    if config.env_state_dim:
        problems.append("observation.environment_state, which a LIBERO request does not carry")
    if config.action_dim != ACTION_DIM:
        problems.append(f"actions of {config.action_dim} values, expected {ACTION_DIM}")
    names = dp.camera_names(config)
    agent = [k for k, n in names.items() if n in AGENT_VIEW_CAMERAS]
    wrist = [k for k, n in names.items() if n in WRIST_CAMERAS]
    if config.num_cameras == 2 and (len(agent) != 1 or len(wrist) != 1):
        problems.append(f"cameras {list(names)} are not one agent view (observation.images.<name> or "
                        f"observation.<name>, name in {list(AGENT_VIEW_CAMERAS)}) and one wrist camera (name in "
                        f"{list(WRIST_CAMERAS)})")
    if problems:
        raise ConfigMismatchError(f"{config.source}: this Diffusion Policy does not take LIBERO requests: "
                                  + "; ".join(problems) + f". Its input features: {found}")
    return agent[0], wrist[0]


@dataclasses.dataclass
class DiffusionLiberoTransforms(LiberoTransforms):
    """LIBERO request -> one history frame (uint8 CHW images per LeRobot key, raw state); model actions -> env
    actions (the postprocessor's unnormalisation). Normalisation happens in ``DiffusionPolicyModel.prepare``."""

    config: DiffusionConfig
    tokenizer: None = None
    normalizer: Normalizer | None = None
    default_prompt: str | None = ""  # the prompt is unused, so requests need none

    def __post_init__(self) -> None:
        self.agent_key, self.wrist_key = libero_camera_keys(self.config)

    def image_hw(self) -> tuple[int, int]:
        return tuple(self.config.image_shape[1:])

    def inputs(self, obs: dict) -> dict:
        _, raw_state, _, base, wrist = self.parse(obs)
        return {"images": {self.agent_key: np.ascontiguousarray(base.transpose(2, 0, 1)),
                           self.wrist_key: np.ascontiguousarray(wrist.transpose(2, 0, 1))},
                "raw_state": raw_state}

    def outputs(self, actions: np.ndarray, inputs: dict) -> np.ndarray:
        return np.asarray(self.normalizer.unnormalize(ACTION, actions), np.float32)


# ------------------------------------------------------------------------------------------ history


class ObservationHistory:
    """The last ``n_obs_steps`` queried frames of each episode (key and reset rule: the module docstring).
    Thread-safe; bounded to ``max_episodes`` episodes, least recently queried dropped first."""

    def __init__(self, n_obs_steps: int, max_episodes: int = DEFAULT_MAX_HISTORIES) -> None:
        if n_obs_steps < 1 or max_episodes < 1:
            raise ValueError(f"need n_obs_steps >= 1 and max_episodes >= 1, got {n_obs_steps}, {max_episodes}")
        self.n_obs_steps = n_obs_steps
        self.max_episodes = max_episodes
        self._episodes: collections.OrderedDict[tuple, collections.deque] = collections.OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key_of(meta: Mapping[str, Any]) -> tuple:
        if all(f in meta for f in HISTORY_KEY_FIELDS):
            return ("episode", str(meta.get("run_id", "")), *(str(meta[f]) for f in HISTORY_KEY_FIELDS),
                    str(meta.get("attempt", "")))
        if "connection_id" in meta:
            return ("connection", str(meta["connection_id"]))
        if "run_id" in meta:
            return ("run", str(meta["run_id"]))
        return ("local",)

    @staticmethod
    def position_of(meta: Mapping[str, Any]) -> int | None:
        value = meta.get("env_step", meta.get("request_index"))
        return None if value is None else int(value)

    def push(self, meta: Mapping[str, Any], frame: dict) -> tuple[list[dict], dict]:
        """Add a request's frame; returns the ``n_obs_steps`` frames it is conditioned on (oldest first) and
        ``{"positions", "reset"}``."""
        key, pos = self.key_of(meta), self.position_of(meta)
        with self._lock:
            frames = self._episodes.get(key)
            last = frames[-1][0] if frames else None
            reset = frames is None or pos == 0 or (pos is not None and last is not None and pos < last)
            if reset:
                if frames is None and pos:
                    logger.info("observation history of %s starts at position %d (a client that joined mid-episode, "
                                "or a history dropped after %d other episodes)", key, pos, self.max_episodes)
                frames = collections.deque([(pos, frame)] * self.n_obs_steps, maxlen=self.n_obs_steps)
            elif pos is not None and pos == last:
                frames[-1] = (pos, frame)
            else:
                frames.append((pos, frame))
            self._episodes[key] = frames
            self._episodes.move_to_end(key)
            while len(self._episodes) > self.max_episodes:
                self._episodes.popitem(last=False)
            window = list(frames)
        return [f for _, f in window], {"positions": [p for p, _ in window], "reset": reset}

    def reset(self) -> None:
        with self._lock:
            self._episodes.clear()

    def __len__(self) -> int:
        return len(self._episodes)


# ------------------------------------------------------------------------------------------ span table and sites


def dp_span_table(config: DiffusionConfig, positions: list[int | None]) -> dict:
    """The span table of one Diffusion Policy request: no token sequence (``seq_len`` 0, no spans), plus what its
    rows need to be read: the history positions behind the ``obs_step`` axis, the denoising timesteps behind
    ``denoise_step``, the executed slice of the chunk and each camera's feature-map grid."""
    schedule = schedulers.make_schedule(config)
    window = dp.action_slice(config)
    return {
        "model": "diffusion",
        "seq_len": 0,
        "prefix_len": 0,
        "grid": list(config.feature_map_hw),
        "spans": {},
        "camera_valid": {name: True for name in dp.camera_names(config).values()},
        "rows": "no tokens: encoder rows hold every history frame (obs_step axis) of one request, per-step rows one "
                "denoising step (denoise_step = step index, timestep in denoise_timesteps)",
        "obs_positions": [None if p is None else int(p) for p in positions],
        "denoise_timesteps": [int(t) for t in schedule.timesteps],
        "chunk_slice": [window.start, window.stop],
        "cameras": {name: {"key": key, **camera_grid(config)} for key, name in dp.camera_names(config).items()},
    }


def camera_grid(config: DiffusionConfig) -> dict:
    """``attention_grid`` as JSON values (lists, so a store reopened from JSON compares equal)."""
    return json.loads(json.dumps(dp.attention_grid(config)))


def dp_site_info(config: DiffusionConfig) -> dict[str, dict]:
    """Extra store site info: the camera and attention grid of every site laid out over the feature map."""
    out = {}
    for key, name in dp.camera_names(config).items():
        for stage in ("attn", "kp_logits"):
            out[f"enc.{name}.{stage}"] = {"camera": key, "attention_grid": camera_grid(config)}
    return out


def dp_config_dict(config: DiffusionConfig) -> dict:
    """The config as JSON values (for the store's ``model_config`` and metadata), without its source path."""
    raw = dataclasses.asdict(config)
    raw.pop("source")
    return {"model_type": "diffusion", **json.loads(json.dumps(raw))}


# ------------------------------------------------------------------------------------------ policy


class DiffusionPolicy(Policy):
    """A :class:`Policy` over a :class:`DiffusionPolicyModel`; ``num_steps`` is the config's denoising steps."""

    def __init__(self, model: DiffusionPolicyModel, transforms: DiffusionLiberoTransforms, *,
                 max_histories: int = DEFAULT_MAX_HISTORIES, **kwargs: Any) -> None:
        if kwargs.get("knockouts"):
            raise ValueError(_NO_KNOCKOUTS)
        if "num_steps" in kwargs:
            raise TypeError("a Diffusion Policy's denoising steps come from its config (num_inference_steps); "
                            "change them with model.with_config(num_inference_steps=N)")
        self.history = ObservationHistory(model.config.n_obs_steps, max_histories)
        super().__init__(model, transforms, num_steps=model.config.inference_steps, **kwargs)

    @staticmethod
    def hook_table_for(config, num_steps: int) -> HookTable:
        return dp.hook_table(config)

    @contextlib.contextmanager
    def hooks(self, requests: HookRequest | Iterable[HookRequest]) -> Iterator[Policy]:
        reqs = [requests] if isinstance(requests, (Record, Intervention, AttentionKnockout)) else list(requests)
        if any(isinstance(r, AttentionKnockout) for r in reqs):
            raise ValueError(_NO_KNOCKOUTS)
        with super().hooks(reqs) as policy:
            yield policy

    def reset_history(self) -> None:
        """Forget every episode's frames (requests without ``meta/env_step`` never reset on their own)."""
        self.history.reset()

    # -------------------------------------------------------------------------------------- noise

    def noise_shape(self) -> tuple[int, int, int]:
        """x_T plus one variance noise per denoising step when the scheduler draws any (DDPM)."""
        cfg = self.model.config
        return 1 + (self.num_steps if schedulers.uses_step_noise(cfg) else 0), cfg.horizon, cfg.action_dim

    def _noise_layout(self) -> str:
        return f": x_T then the variance noise of each of the {self.noise_shape()[0] - 1} DDPM denoising steps"

    # -------------------------------------------------------------------------------------- model

    def _prepare(self, obs: dict) -> tuple[dict, dict]:
        meta, frame = super()._prepare(obs)  # a request that fails to parse leaves its history untouched
        frames, info = self.history.push(meta, frame)
        return meta, {"frames": frames, "raw_state": frame["raw_state"], "history": info}

    def _call_model(self, rows: list[dict], noises: list[np.ndarray], records: tuple[Record, ...]
                    ) -> tuple[np.ndarray, dict[str, np.ndarray], list[dict]]:
        cfg = self.model.config
        raw = {k: np.stack([np.stack([f["images"][k] for f in r["frames"]]) for r in rows]) for k in cfg.image_keys}
        raw[OBS_STATE] = np.stack([np.stack([f["raw_state"] for f in r["frames"]]) for r in rows])
        noise = np.concatenate(noises, axis=0)  # (B, 1 + S, horizon, action_dim)
        step_noise = np.moveaxis(noise[:, 1:], 1, 0) if noise.shape[1] > 1 else None
        actions, recorded = self.model.sample_actions(self.model.prepare(raw), noise[:, 0], step_noise=step_noise,
                                                      records=records, interventions=self.interventions)
        infos = [{"positions": r["history"]["positions"], "reply": {"obs_history": r["history"]}} for r in rows]
        return np.asarray(actions), {k: np.asarray(v) for k, v in recorded.items()}, infos

    def _span_table(self, inputs: dict, info: dict) -> dict:
        return dp_span_table(self.model.config, info["positions"])


_NO_KNOCKOUTS = ("a Diffusion Policy has no attention layers to knock out (its spatial softmax is per-camera "
                 "keypoint attention over a feature map): edit enc.<cam>.* sites with Intervention instead")


# ------------------------------------------------------------------------------------------ construction


def load_libero_model(folder: str | pathlib.Path, num_steps: int | None = None) -> DiffusionPolicyModel:
    """A LeRobot Diffusion Policy folder checked for LIBERO's inputs; ``num_steps`` overrides the config's
    ``num_inference_steps`` (as LeRobot allows). Errors name the folder and what is missing or mismatched."""
    folder = pathlib.Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a directory (a LeRobot Diffusion Policy folder holds config.json, "
                                "model.safetensors and policy_{pre,post}processor.json)")
    if not (folder / "config.json").is_file():
        hint = (" (it has params/: an openpi checkpoint, served with a pi0_* / pi05_* / pi0_fast_* config)"
                if (folder / "params").exists() else "")
        raise FileNotFoundError(f"{folder}: no config.json, so not a LeRobot policy folder (expected config.json, "
                                f"model.safetensors, policy_preprocessor.json, policy_postprocessor.json){hint}")
    libero_camera_keys(load_config(folder / "config.json"))  # a mismatch is reported before 50+ MB of weights load
    model = DiffusionPolicyModel.load(folder)
    return model if num_steps is None else model.with_config(num_inference_steps=num_steps)


__all__ = ["ConfigMismatchError", "DiffusionLiberoTransforms", "DiffusionPolicy", "ObservationHistory",
           "dp_config_dict", "dp_site_info", "dp_span_table", "libero_camera_keys", "load_libero_model"]
