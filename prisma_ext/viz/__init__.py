"""Plotly figures, and nothing else: `figures` (AnalysisResult figures on the patch grid, the
logit lens, method comparisons), `heads` (head gallery, head types), `overlay` (maps drawn over
the image). The numbers come from `prisma_ext.analysis`; the report is `prisma_ext.report`.
plotly is imported on first use."""
