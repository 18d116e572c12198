"""The distributed seam: training loops call one :class:`Backend` and never branch on what runs them."""

from rlhf.backend.base import Backend

__all__ = ["Backend"]
