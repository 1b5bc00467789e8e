"""Sub-commands of the `flywheel` CLI, one module per room."""
