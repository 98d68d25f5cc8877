"""Search-space files (YAML) shipped with the package; `tuning.spaces` loads them by name."""
