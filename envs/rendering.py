"""Fast offscreen rendering of several cameras from one MuJoCo renderer, in the correct orientation.

Meta-World's ``corner*`` cameras are mounted rolled by ~180° (their image "up" points down in the world), so
their raw images are upside-down. A camera frame is a proper rotation, so the fix is a 180° rotation of the
image (flip rows *and* columns); flipping rows alone would mirror the scene left-right. Which cameras need it
is derived from the model: a fixed camera whose up vector has a negative world-z component.
"""

from __future__ import annotations

import os
import weakref

os.environ.setdefault("MUJOCO_GL", "egl")

import mujoco
import numpy as np


def configure_fast_rendering(model: mujoco.MjModel, width: int, height: int) -> None:
    """Turn shadows and multisampling off and make the offscreen buffer at least ``width``×``height``."""
    model.vis.quality.shadowsize = 0
    model.vis.quality.offsamples = 0
    model.vis.global_.offwidth = max(model.vis.global_.offwidth, width)
    model.vis.global_.offheight = max(model.vis.global_.offheight, height)


def camera_names(model: mujoco.MjModel) -> list[str]:
    """Names of the model's cameras."""
    return [mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_CAMERA, index) for index in range(model.ncam)]


def camera_is_upside_down(model: mujoco.MjModel, data: mujoco.MjData, camera: str) -> bool:
    """True if the camera's image "up" axis points downward in the world (its raw image is upside-down)."""
    camera_id = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, camera)
    up_axis = data.cam_xmat[camera_id].reshape(3, 3)[:, 1]
    return bool(up_axis[2] < 0.0)


def orient(image: np.ndarray, upside_down: bool) -> np.ndarray:
    """Rotate an upside-down image by 180° (a view, no copy); return others unchanged."""
    return image[::-1, ::-1] if upside_down else image


class CameraRenderer:
    """Renders named cameras of one MuJoCo model with a single offscreen renderer.

    ``render(data)`` returns ``{camera: H×W×3 uint8}`` (contiguous arrays, correct orientation). Call
    ``close()`` to free the GL context early (it is freed anyway when the renderer is collected or at exit).
    """

    def __init__(
        self, model: mujoco.MjModel, data: mujoco.MjData, cameras: list[str], width: int, height: int
    ) -> None:
        known = camera_names(model)
        for camera in cameras:
            if camera not in known:
                raise ValueError(f"cameras: unknown camera {camera!r}; expected one of {known}")
        configure_fast_rendering(model, width, height)
        mujoco.mj_forward(model, data)
        self.cameras = list(cameras)
        self._upside_down = {camera: camera_is_upside_down(model, data, camera) for camera in cameras}
        self._renderer = mujoco.Renderer(model, height=height, width=width)
        # Free the GL context when this object goes away or, at the latest, before interpreter shutdown.
        self._finalizer = weakref.finalize(self, self._renderer.close)

    def render(self, data: mujoco.MjData) -> dict[str, np.ndarray]:
        """Render every camera from the current simulator state."""
        if not self._finalizer.alive:
            raise RuntimeError("CameraRenderer.render called after close()")
        images = {}
        for camera in self.cameras:
            self._renderer.update_scene(data, camera=camera)
            raw = self._renderer.render()
            images[camera] = np.ascontiguousarray(orient(raw, self._upside_down[camera]))
        return images

    def close(self) -> None:
        """Free the renderer's GL context (idempotent)."""
        self._finalizer()
