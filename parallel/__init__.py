"""Process groups and the parallel plans that wrap the model (DDP today; FSDP2, TP, EP next)."""
