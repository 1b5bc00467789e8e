"""flywheel: policies."""
