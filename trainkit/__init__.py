"""trainkit: config schema, job spec, model, data, loop, checkpoints and metrics."""
