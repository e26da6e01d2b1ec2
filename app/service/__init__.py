"""The guard service: FastAPI app, micro-batching worker, per-client tracking, metrics."""
