"""Plotly figures, and nothing else: `figures` (AnalysisResult figures on the patch grid, the
logit lens, method comparisons), `heads` (head gallery, head types), `overlay` (maps drawn over
the image), `clip` (the CLIP methods: the embedding split by head, TextSpan, head ablation,
zero-shot segmentation, high-norm tokens, test-time registers). The numbers come from
`prisma_ext.analysis`; the report is `prisma_ext.report`. plotly is imported on first use."""
