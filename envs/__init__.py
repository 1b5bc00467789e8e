"""flywheel: envs."""
