"""Training: turns data sets into the model bundles the daemon loads (`mmfuse-train`)."""
