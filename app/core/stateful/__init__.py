"""Stateful detection of query attacks: a fingerprint per query, a match rule, a bounded store.

A query attack (Square, HopSkipJump, Boundary) sends hundreds of images that are each a tiny
perturbation of the ones before: per-image scores cannot see it, the *sequence* can. Honest
users also resend a photo, edit it, or share a viral one, so "this query resembles an earlier
one" alone flags them. What honest users do not do is send many *distinct* images that are
pixel-for-pixel almost identical: edits (crops, resizes, flips, brightness) move most pixels
by more than an attack's step, and only re-encodings of one photo stay that close, a handful at
a time. The detector therefore counts, for each query, the distinct earlier queries that are
near-exact copies of it (exact copies, resends, do not count), among the same client's recent
queries and among every client's (account-oblivious, so Sybil ids do not help), and flags when
either count reaches its threshold.

Three fingerprints were compared (evaluation/stateful_eval.py); all are pure functions
(``hashes``):

- ``window_hashes``: Blacklight's (Li et al. 2022) keyed hashes of quantised pixel windows,
  keeping the ``top`` largest, stored as a 1024-bit sketch; similarity = bits in common (about
  the hashes in common). The key comes from a secret, so an attacker cannot tell which windows
  count.
- ``perceptual_hashes``: a 64-bit DCT pHash of the grey image; similarity = 64 - Hamming.
- ``embeddings``: a pooled feature of the forward pass the guard already runs, L2-normalised;
  similarity = cosine.

The package, in the order its modules build on one another:

- ``hashes``: the fingerprints' pure functions and the pixel digest of an exact copy;
- ``close_copies``: block means, the saturation test and the index keys of close copies;
- ``schemes``: a fingerprint and its similarity (``Scheme``), one class per fingerprint;
- ``match_rule``: near-duplicates, their counts per client and across clients, and the
  ``DetectionRule`` that flags;
- ``index`` and ``bucket_index``: the buckets a query is filed under, and the table that holds
  them in process;
- ``store``: the store protocol (``FingerprintStore``) and the bounded in-process store;
- ``blends``: the blend test (a query on the line through two of its client's recent queries:
  a decision-based attack's binary search), its sketch, and its bounded in-process memory;
- ``defaults``: the measured default scheme and rule.
"""
