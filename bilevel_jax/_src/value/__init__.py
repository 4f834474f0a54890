"""Smoothed value functions (entropic, quadratic) and the (VFP_eps) solver.

Equation, section, definition and proposition numbers refer to the value-function
smoothing paper of Alcantara, Nguyen, Chen and Lin (quadratic and entropic
regularization of the lower-level value function).
"""
