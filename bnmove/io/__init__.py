"""Files in and out: loading models from what users have, writing converted models as code."""
