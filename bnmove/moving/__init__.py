"""Moving pairs: the BN math, what a move does to parameters, module and graph surgery, ``convert``, verification."""
