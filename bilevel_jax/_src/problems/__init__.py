"""Test problems with known answers (Example 1, quadratic) and hyper-cleaning."""
