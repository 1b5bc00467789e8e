"""Fast offscreen rendering of several cameras from one MuJoCo renderer, in the correct orientation.

Meta-World's ``corner*`` cameras are mounted rolled by ~180° (their image "up" points down in the world), so
their raw images are upside-down. A camera frame is a proper rotation, so the fix is a 180° rotation of the
image (flip rows *and* columns); flipping rows alone would mirror the scene left-right. Which cameras need it
is derived from the model: a fixed camera whose up vector has a negative world-z component.

Threads: a GL context is current on at most one thread at a time (EGL refuses to make it current on a second
one: ``EGL_BAD_ACCESS``), and a Ray actor with ``max_concurrency`` > 1 builds its envs on one thread and steps
them on another (and successive calls may land on different threads). So ``CameraRenderer`` makes its context
on the thread that first renders and leaves it current on no thread between ``render`` calls: any thread can
render, and ``close`` works from any thread.
"""

from __future__ import annotations

import os
import threading
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

    ``render(data)`` returns ``{camera: H×W×3 uint8}`` (contiguous arrays, correct orientation) and may be called
    from any thread (one at a time; calls are serialized). The GL context is made at the first ``render``. Call
    ``close()`` (from any thread) to free it early; it is freed anyway when the renderer is collected or at exit.
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
        self._model, self._width, self._height = model, width, height
        self._gl = _GLState()
        # Free the GL context when this object goes away or, at the latest, before interpreter shutdown.
        self._finalizer = weakref.finalize(self, self._gl.close)

    def render(self, data: mujoco.MjData) -> dict[str, np.ndarray]:
        """Render every camera from the current simulator state (on the calling thread)."""
        with self._gl.lock:
            if not self._finalizer.alive:
                raise RuntimeError("CameraRenderer.render called after close()")
            try:
                if self._gl.renderer is None:
                    self._gl.renderer = mujoco.Renderer(self._model, height=self._height, width=self._width)
                return {camera: self._render_camera(data, camera) for camera in self.cameras}
            finally:
                release_current_context()

    def close(self) -> None:
        """Free the renderer's GL context (idempotent, from any thread)."""
        self._finalizer()

    def _render_camera(self, data: mujoco.MjData, camera: str) -> np.ndarray:
        self._gl.renderer.update_scene(data, camera=camera)
        raw = self._gl.renderer.render()  # makes the context current on this thread
        return np.ascontiguousarray(orient(raw, self._upside_down[camera]))


class _GLState:
    """A ``CameraRenderer``'s lazily made ``mujoco.Renderer`` and the lock that serializes its use."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.renderer: mujoco.Renderer | None = None

    def close(self) -> None:
        """Free the GL context: it is current on no thread between renders, so any thread may free it."""
        with self.lock:
            if self.renderer is not None:
                self.renderer.close()
                self.renderer = None


def release_current_context() -> None:
    """Leave no GL context current on the calling thread, so another thread can make it current.

    Covers the backends ``mujoco.Renderer`` uses on Linux (``MUJOCO_GL`` = ``egl``, ``osmesa``, ``glfw``).
    """
    backend = mujoco.gl_context.GLContext.__module__
    if backend == "mujoco.egl":
        from mujoco import egl

        if egl.EGL_DISPLAY is None:  # no context was ever made in this process
            return
        egl.EGL.eglMakeCurrent(
            egl.EGL_DISPLAY, egl.EGL.EGL_NO_SURFACE, egl.EGL.EGL_NO_SURFACE, egl.EGL.EGL_NO_CONTEXT
        )
    elif backend == "mujoco.osmesa":
        from mujoco.osmesa import GL, osmesa

        osmesa.OSMesaMakeCurrent(None, None, GL.GL_FLOAT, 0, 0)
    elif backend == "mujoco.glfw":
        from mujoco.glfw import glfw

        glfw.make_context_current(None)
