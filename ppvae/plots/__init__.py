"""Figures (matplotlib, Agg backend): samples and reconstructions, evaluation reports."""
