"""Dependency-free building blocks every room may import: core types, the msgpack codec, the dynamic batcher.

Nothing here imports another flywheel room, torch, mujoco, sqlalchemy or Ray, so a robot computer can use it
with numpy and msgpack alone.
"""
