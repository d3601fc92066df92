"""The sample model definitions (they live in ``bnmove.sample_models`` so that the
installed package, ``bnmove demo`` and pickled sample files can use them anywhere).

Use them as ``--arch samples.models:resnet`` from this repository, or
``--arch bnmove.sample_models:resnet`` from anywhere.
"""

from bnmove.sample_models import *  # noqa: F403
from bnmove.sample_models import SAMPLES, __all__  # noqa: F401
