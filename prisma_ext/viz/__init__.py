"""Plotly figures for analysis results (plotly is imported on first use)."""
