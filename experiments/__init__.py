"""flywheel: experiments."""
