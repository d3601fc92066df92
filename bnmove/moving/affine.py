"""Where bnmove 0.1 kept :class:`ChannelAffine`: models converted then and saved whole name it here."""

from ..core.affine import ChannelAffine

__all__ = ["ChannelAffine"]
