"""Load a `flywheel export --format lerobot` folder with LeRobot's own loader and check what it returns.

Runs in an isolated virtual environment, never flywheel's (LeRobot pins other numpy/huggingface_hub versions):

    python3 -m venv /tmp/lerobot-venv
    /tmp/lerobot-venv/bin/pip install torch==2.13.0 torchvision==0.28.0 lerobot-dataset==0.4.4
    flywheel export --format lerobot --tasks reach-v3 --output /tmp/reach-lerobot
    /tmp/lerobot-venv/bin/python scripts/check_lerobot_official.py /tmp/reach-lerobot

``lerobot-dataset`` 0.4.4 is LeRobot's ``LeRobotDataset`` (codebase v3.0) packaged alone. Two shims make it run
on a CPU-only machine, both outside LeRobot's code: the registry's torchvision is a CUDA build whose compiled
ops do not load beside the CPU torch, so the two op schemas torchvision's Python registers fakes for are
declared first; and torchvision 0.28 no longer has ``torchvision.io.VideoReader``, which LeRobot's ``pyav``
video backend reads through (its ``torchcodec`` backend needs a CUDA torchcodec here), so a PyAV reader with
the same interface stands in for it. LeRobot's own code then does everything else: reads ``meta/``, finds each
episode's rows and video segment (``from_timestamp``), picks the frame nearest each timestamp within its
tolerance, and returns tensors. Exits 1 with the first mismatch.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import av
import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

_TORCHVISION_OPS = torch.library.Library("torchvision", "DEF")
for _op in ("nms", "qnms"):
    _TORCHVISION_OPS.define(f"{_op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")

import torchvision  # noqa: E402  (after the op schemas above)


class PyAVVideoReader:
    """``torchvision.io.VideoReader`` (removed in torchvision 0.28) over PyAV: seek, then frames as dicts."""

    def __init__(self, path: str, stream: str = "video") -> None:
        self.container = av.open(path)
        self._stream = self.container.streams.video[0]
        self._start = 0.0

    def seek(self, seconds: float, keyframes_only: bool = False) -> PyAVVideoReader:
        self._start = seconds
        self.container.seek(int(seconds / self._stream.time_base), stream=self._stream, backward=True)
        return self

    def __iter__(self):
        for frame in self.container.decode(self._stream):
            data = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)
            yield {"pts": float(frame.time), "data": data}


torchvision.io.VideoReader = PyAVVideoReader

from ledataset.datasets.lerobot_dataset import LeRobotDataset  # noqa: E402


def check(root: Path) -> str:
    """Load ``root`` with ``LeRobotDataset`` and compare every frame's scalars, vectors and task with the
    files; returns a one-line summary or raises ``AssertionError``."""
    dataset = LeRobotDataset("flywheel/export", root=root, video_backend="pyav")
    info = dataset.meta.info
    assert info["codebase_version"] == "v3.0", info["codebase_version"]
    data = pq.read_table(sorted((root / "data").glob("chunk-*/file-*.parquet"))[0]).to_pydict()
    assert dataset.num_frames == info["total_frames"] and dataset.num_episodes == info["total_episodes"]
    cameras = dataset.meta.camera_keys
    for index in range(min(len(dataset), len(data["index"]))):
        item = dataset[index]
        assert int(item["index"]) == data["index"][index], (index, item["index"])
        assert int(item["episode_index"]) == data["episode_index"][index]
        assert int(item["frame_index"]) == data["frame_index"][index]
        np.testing.assert_allclose(item["action"].numpy(), np.array(data["action"][index]), rtol=1e-6)
        assert item["task"] == dataset.meta.tasks.index[data["task_index"][index]]
        for camera in cameras:
            shape = tuple(dataset.meta.features[camera]["shape"])
            assert tuple(item[camera].shape) == (shape[2], shape[0], shape[1]), (camera, item[camera].shape)
            if dataset.meta.features[camera]["dtype"] == "image":  # lossless: the very pixels written
                written = np.asarray(Image.open(io.BytesIO(data[camera][index]["bytes"])))
                loaded = (item[camera].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
                np.testing.assert_array_equal(loaded, written)
    kinds = {dataset.meta.features[camera]["dtype"] for camera in cameras} or {"none"}
    return (
        f"ok: LeRobotDataset loaded {root}: {dataset.num_episodes} episodes, {dataset.num_frames} frames, "
        f"{dataset.fps} fps, robot {dataset.meta.robot_type}, cameras {', '.join(cameras) or 'none'} "
        f"({'/'.join(sorted(kinds))}), tasks {list(dataset.meta.tasks.index)}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("roots", nargs="+", type=Path, help="exported LeRobot dataset folders")
    args = parser.parse_args()
    for root in args.roots:
        try:
            print(check(root))
        except AssertionError as error:
            print(f"MISMATCH in {root}: {error}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
