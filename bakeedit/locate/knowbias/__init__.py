"""KnowBias (arXiv 2601.21864): integrated gradients on yes/no bias-knowledge questions (``method``), with the
batched, prefix-cached IG estimator in ``ig``. The registry (``locate/registry.py``) imports
``method``, which registers it."""
