"""bayessparse: Bayesian sparsification of neural networks with PyTorch and Pyro."""
