"""flywheel: actors."""
