"""Reading a model: what is a BN or an activation, the analysis graph, and the pairs with their reasons."""
