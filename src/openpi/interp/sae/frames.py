"""Frame thumbnails of top-activating moments, read from rollout frame files and joined by (episode, env_step).

Frames file (docs/conventions.md): `<frames_dir>/<stem>.npz` with `agentview (T,H,W,3) uint8`, `wrist (T,H,W,3)
uint8` and `env_step (T,)`. Each thumbnail is one PNG with the available cameras side by side.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import numpy as np

CAMERAS = ("agentview", "wrist")


class FrameFiles:
    """Lazily opened frame files with a one-episode cache (requests should be grouped by episode)."""

    def __init__(self, frames_dir: str | pathlib.Path, cameras: Sequence[str] = CAMERAS) -> None:
        self.dir = pathlib.Path(frames_dir)
        if not self.dir.is_dir():
            raise FileNotFoundError(f"frames directory not found: {self.dir}")
        self.cameras = tuple(cameras)
        self._stem: str | None = None
        self._data: dict[str, np.ndarray] = {}

    def _load(self, stem: str) -> dict[str, np.ndarray]:
        if stem != self._stem:
            p = self.dir / f"{stem}.npz"
            if not p.is_file():
                raise FileNotFoundError(f"frames of episode {stem} not found: {p}")
            with np.load(p, allow_pickle=False) as z:
                if "env_step" not in z.files:
                    raise KeyError(f"{p}: no 'env_step' array (found {z.files})")
                cams = [c for c in self.cameras if c in z.files]
                if not cams:
                    raise KeyError(f"{p}: none of the cameras {self.cameras} (found {z.files})")
                self._data = {c: z[c] for c in cams}
                self._data["env_step"] = np.asarray(z["env_step"], np.int64)
            self._stem = stem
        return self._data

    def frame(self, stem: str, env_step: int) -> np.ndarray:
        """(H, W * n_cameras, 3) uint8 image of the cameras at `env_step` of episode `stem`."""
        d = self._load(stem)
        hit = np.flatnonzero(d["env_step"] == env_step)
        if hit.size == 0:
            raise KeyError(f"{self.dir / (stem + '.npz')}: no frame at env_step {env_step}")
        i = int(hit[0])
        imgs = [np.asarray(d[c][i]) for c in self.cameras if c in d]
        h = min(im.shape[0] for im in imgs)
        return np.concatenate([im[:h] for im in imgs], axis=1).astype(np.uint8)


def write_thumbnails(tops: dict[int, list[dict]], frames_dir: str | pathlib.Path, out_dir: str | pathlib.Path, rel_to: str | pathlib.Path, max_side: int = 448) -> dict:
    """Write `out_dir/f{feature:05d}_r{rank:02d}.png` for every top moment; set item["image"] (path relative
    to `rel_to`) or item["image_error"]. Returns {"written": n, "missing": n, "errors": [first few]}."""
    from PIL import Image

    files = FrameFiles(frames_dir)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reqs = [(t["stem"], t["env_step"], f, t) for f, items in tops.items() for t in items]
    reqs.sort(key=lambda r: (r[0], r[1]))
    written, errors = 0, []
    for stem, step, f, item in reqs:
        try:
            img = files.frame(stem, step)
        except (FileNotFoundError, KeyError) as err:
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
