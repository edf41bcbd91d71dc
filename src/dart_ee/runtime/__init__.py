"""Real early exit: the eager runner (batch compaction) and the queued runner (a queue per stage, CUDA graphs)."""
