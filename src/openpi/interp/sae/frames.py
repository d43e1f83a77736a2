"""Frame thumbnails of top-activating moments, read from the rollout folder's frame files and joined by
(episode, env_step) through the one frames reader (openpi.interp.episode_frames).

Each thumbnail is one PNG with the available cameras side by side (agent view | wrist), as the policy saw them.
"""

from __future__ import annotations

import pathlib

import numpy as np

from openpi.interp.episode_frames import EpisodeFrames, frames_path
from openpi.interp.join import JoinError
from openpi.shared.records import EpisodeKey, RolloutDir


class FrameFiles:
    """Lazily opened frame files with a one-episode cache (requests should be grouped by episode)."""

    def __init__(self, rollouts: RolloutDir) -> None:
        self.rollouts = rollouts
        self._key: EpisodeKey | None = None
        self._frames: EpisodeFrames | None = None

    def _load(self, key: EpisodeKey) -> EpisodeFrames:
        if key != self._key:
            path = (frames_path(self.rollouts, self.rollouts.record(key)) if self.rollouts.has(key)
                    else self.rollouts.frames_npz(key))
            self._frames, self._key = EpisodeFrames.load(path), key
        return self._frames

    def frame(self, key: EpisodeKey, env_step: int) -> np.ndarray:
        """(H, W * n_cameras, 3) uint8 image of the cameras at `env_step` of episode `key`."""
        frames = self._load(key)
        row = frames.row_of(env_step)
        imgs = [np.asarray(img[row]) for img in frames.images.values()]
        h = min(im.shape[0] for im in imgs)
        return np.concatenate([im[:h] for im in imgs], axis=1).astype(np.uint8)


def write_thumbnails(tops: dict[int, list[dict]], rollouts: RolloutDir, out_dir: str | pathlib.Path,
                     rel_to: str | pathlib.Path, max_side: int = 448) -> dict:
    """Write `out_dir/f{feature:05d}_r{rank:02d}.png` for every top moment; set item["image"] (path relative
    to `rel_to`) or item["image_error"]. Returns {"written": n, "missing": n, "errors": [first few]}."""
    from PIL import Image

    files = FrameFiles(rollouts)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reqs = [(t["stem"], t["env_step"], f, t) for f, items in tops.items() for t in items]
    reqs.sort(key=lambda r: (r[0], r[1]))
    written, errors = 0, []
    for stem, step, f, item in reqs:
        try:
            img = files.frame(EpisodeKey.from_stem(stem), step)
        except JoinError as err:
            item["image"] = None
            item["image_error"] = str(err)
            errors.append(str(err))
            continue
        im = Image.fromarray(img)
        scale = max_side / max(im.size)
        if scale < 1:
            im = im.resize((max(1, int(im.size[0] * scale)), max(1, int(im.size[1] * scale))))
        p = out / f"f{f:05d}_r{item['rank']:02d}.png"
        im.save(p)
        base = pathlib.Path(rel_to).resolve()
        item["image"] = str(p.resolve().relative_to(base)) if p.resolve().is_relative_to(base) else str(p.resolve())
        written += 1
    return {"written": written, "missing": len(errors), "errors": errors[:5]}
