"""Foundation every stage shares: BN math, the kept-affine layer, running and comparing models,
module surgery helpers, generated forwards, cloning and atomic writes. Imports nothing of bnmove above ``errors``."""
