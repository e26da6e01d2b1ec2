"""The offline builder job: labelled images -> features -> processing + FAISS index -> bundle.

Imports the core (``app.core``), never the web layer.
"""
