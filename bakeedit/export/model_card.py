"""A :class:`huggingface_hub.ModelCard` from a markdown body and its ``ModelCardData``: the one way every card
bakeedit writes (baked checkpoint, GGUF folder, adapter folder) is put together.

The front matter is never written by hand: ``str(card)`` renders it from ``card.data``. huggingface_hub warns that a
body without a metadata block has none; here the data is set right after, so that warning is silenced.
"""

from __future__ import annotations

import logging
from typing import Any


def model_card(body: str, data: Any):
    """``ModelCard(body)`` with ``data`` (a ``ModelCardData``) as its front matter."""
    from huggingface_hub import ModelCard

    logger = logging.getLogger("huggingface_hub.repocard")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        card = ModelCard(body)
    finally:
        logger.setLevel(level)
    card.data = data
    return card
