"""flywheel: storage."""
