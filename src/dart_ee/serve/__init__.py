"""Serving over HTTP: the engine (torch or onnxruntime), the batcher that answers each request as its samples leave,
the FastAPI app with its metrics, and an open-loop load generator."""
