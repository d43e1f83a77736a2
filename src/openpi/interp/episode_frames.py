"""The one reader of an episode's frames file (``<rollouts>/frames/<stem>.npz``, written with ``--save-frames``).

Why one reader: the attention join, the SAE thumbnails, the SAE splice score and the export bridges all need "the
image and instance mask the policy saw at env step t". Each row of the file is one executed step and carries its
``env_step``; every reader joins on that column (never on row position) and fails the same clear way when a step,
a camera or the column itself is missing. Layout: ``openpi.envs.rollout`` docstring and docs/conventions.md.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np

from openpi.interp.attention import FRAME_KEY_TO_CAMERA
from openpi.interp.join import JoinError
from openpi.shared.records import EpisodeRecord, RolloutDir

CAMERA_TO_FRAME_KEY: dict[str, str] = {cam: key for key, cam in FRAME_KEY_TO_CAMERA.items()}


def frames_path(rollouts: RolloutDir, record: EpisodeRecord) -> pathlib.Path:
    """Where an episode's frames are: the record's ``frames`` field (relative to the rollout folder, or absolute),
    else the schema's default place."""
    rel = record.raw.get("frames")
    if rel:
        path = pathlib.Path(rel)
        return path if path.is_absolute() else rollouts.root / path
    return rollouts.frames_npz(record.key)


@dataclasses.dataclass
class EpisodeFrames:
    """Frames npz of one episode: per-row ``env_step`` plus images and instance masks per camera span name."""

    path: pathlib.Path
    env_step: np.ndarray
    replan_index: np.ndarray | None
    queried: np.ndarray | None
    images: dict[str, np.ndarray]
    masks: dict[str, np.ndarray]
    instance_names: dict[int, str]
    objects_of_interest: list[str]
    object_ids: dict[str, int]

    @classmethod
    def of(cls, rollouts: RolloutDir, record: EpisodeRecord) -> EpisodeFrames:
        path = frames_path(rollouts, record)
        if not path.is_file():
            raise JoinError(f"frames of episode {record.key.stem} not found: {path} (run the LIBERO client with "
                            "--save-frames)")
        return cls.load(path)

    @classmethod
    def load(cls, path: pathlib.Path) -> EpisodeFrames:
        if not path.is_file():
            raise JoinError(f"frames file {path} not found")
        with np.load(path, allow_pickle=False) as z:
            if "env_step" not in z.files:
                raise JoinError(f"frames file {path} has no 'env_step' array (has {z.files}); it cannot be joined "
                                "to rows by key")
            env_step = np.asarray(z["env_step"]).astype(np.int64)
            if env_step.ndim != 1 or np.unique(env_step).size != env_step.size:
                raise JoinError(f"frames file {path}: 'env_step' must be 1-D without repeats, found shape "
                                f"{env_step.shape} with {env_step.size - np.unique(env_step).size} repeats")
            images, masks = {}, {}
            for key, cam in FRAME_KEY_TO_CAMERA.items():
                if key in z.files:
                    images[cam] = np.asarray(z[key])
                    if images[cam].shape[:1] != env_step.shape or images[cam].ndim != 4:
                        raise JoinError(f"frames file {path}: {key!r} has shape {images[cam].shape}, expected "
                                        f"({env_step.size}, H, W, 3)")
                if f"{key}_seg" in z.files:
                    masks[cam] = np.asarray(z[f"{key}_seg"])
                    if masks[cam].shape[:1] != env_step.shape or masks[cam].ndim != 3:
                        raise JoinError(f"frames file {path}: {key + '_seg'!r} has shape {masks[cam].shape}, "
                                        f"expected ({env_step.size}, H, W)")
            if not images:
                raise JoinError(f"frames file {path} holds none of the cameras {list(FRAME_KEY_TO_CAMERA)} "
                                f"(has {z.files})")
            replan = np.asarray(z["replan_index"]).astype(np.int64) if "replan_index" in z.files else None
            queried = np.asarray(z["queried"]).astype(bool) if "queried" in z.files else None
            names = _json_field(z, "instance_names", path, {})
            ooi = _json_field(z, "objects_of_interest", path, [])
            ids = _json_field(z, "object_instance_ids", path, {})
        return cls(path, env_step, replan, queried, images, masks, {int(k): str(v) for k, v in names.items()},
                   [str(n) for n in ooi], {str(k): int(v) for k, v in ids.items() if v is not None})

    def row_of(self, env_step: int) -> int:
        """Row holding ``env_step`` (the join key); a clear error when there is none."""
        hit = np.flatnonzero(self.env_step == env_step)
        if hit.size == 0:
            raise JoinError(f"frames file {self.path} has no row for env_step {env_step} (its env steps: "
                            f"{_ranges(self.env_step)})")
        return int(hit[0])

    def check_query(self, env_step: int, replan_index: int) -> int:
        """Row of a policy query, checked against the file's ``queried`` / ``replan_index`` columns."""
        row = self.row_of(env_step)
        if self.queried is not None and not self.queried[row]:
            raise JoinError(f"frames file {self.path}: env_step {env_step} is not marked as a policy query, but "
                            "the store has rows for it (frames and store of different runs?)")
        if self.replan_index is not None and int(self.replan_index[row]) != replan_index:
            raise JoinError(f"frames file {self.path}: env_step {env_step} has replan_index "
                            f"{int(self.replan_index[row])}, the store says {replan_index}")
        return row


def _json_field(z, name: str, path: pathlib.Path, default):
    if name not in z.files:
        return default
    try:
        return json.loads(str(z[name]))
    except json.JSONDecodeError as exc:
        raise JoinError(f"frames file {path}: {name!r} is not valid JSON ({exc})") from exc


def _ranges(values: np.ndarray) -> str:
    v = np.unique(values)
    if v.size == 0:
        return "none"
    return f"{v.size} values in {int(v.min())}..{int(v.max())}"
