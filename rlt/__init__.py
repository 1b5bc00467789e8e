"""flywheel: rlt."""
