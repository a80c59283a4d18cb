"""Measuring and showing: metrics, the cached comparison study, plots, inspection of a generation, exact conditional distributions under a constraint. Imports the layers below."""
