"""The pure core shared by the builder, the service and the evaluation.

Nothing in here imports the web layer, Redis or Prometheus. ``search`` is the only module that
imports faiss.
"""
