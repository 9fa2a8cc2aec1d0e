"""The lip-sync pipeline: one module per phase, run and timed by `runner.LipsyncPipeline`."""
