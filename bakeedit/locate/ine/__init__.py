"""Interpretable neuron editing (arXiv 2501.14457): logit importance (``scores``), start-token general-neuron
exclusion and causal masking (``causal``) over our probe sentences (``data``), composed in ``method``. The registry
(``locate/registry.py``) imports ``method``, which registers it."""
