"""Reproduction of the paper's evaluation (Table 2, Figures 2-4) and studies past it."""
