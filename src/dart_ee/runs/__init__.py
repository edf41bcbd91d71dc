"""A run folder: its handle (Run) and the traces made from its model."""
