"""flywheel: recap."""
