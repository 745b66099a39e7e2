"""The analysis layer: methods that take either backend and return `AnalysisResult` objects.

Methods (also top-level names in `prisma_ext`): `logit_lens` (lens.py),
`direct_logit_attribution` (attribution.py), `attention_rollout` and `gradient_attention`
(attention.py), `captum_attribution` (captum_attr.py), `faithfulness` (faithfulness.py),
`compare_attributions` (compare.py). Targets (a class, `LogitDiff`, `ImageTextScore`, a
function) are in targets.py, running a model for a target's score in scoring.py; the model's
readout as a function of residual streams in readout.py; the backend interface in backend.py;
result objects in result.py.
"""
