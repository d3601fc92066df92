"""Files in and out: loading models from what users have, writing converted models as code, and a
converted Hugging Face model as a folder that ``from_pretrained`` loads converted."""

from .pretrained import save_pretrained

__all__ = ["save_pretrained"]
