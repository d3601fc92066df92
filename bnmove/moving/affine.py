"""Where bnmove 0.1 kept [`ChannelAffine`][bnmove.core.affine.ChannelAffine]: models converted then and saved whole name it here."""

from ..core.affine import ChannelAffine

__all__ = ["ChannelAffine"]
