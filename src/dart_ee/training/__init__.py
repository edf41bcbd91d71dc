"""Training a multi-exit network: the joint loss, resume, torchrun / DDP."""
