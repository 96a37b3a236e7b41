"""Toy problems with known answers: the paper's 2D Gaussian study (``gaussian``)."""
