"""Ray actors of the daemon, one module per stage of mmfuse.pipeline.PIPELINE: each a thin
wrapper around its stage's I/O-free class in the package root. They find each other by
name (Ray named actors), so a restarted actor is found again without rewiring."""
