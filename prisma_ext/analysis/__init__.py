"""The analysis layer: methods that take either backend and return `AnalysisResult` objects."""
