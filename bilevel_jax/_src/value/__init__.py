"""Smoothed value functions (entropic, quadratic) and the (VFP_eps) solver."""
