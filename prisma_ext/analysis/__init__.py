"""The analysis layer: methods that take either backend and return `AnalysisResult` objects.

Every method takes `(model, images, target=None, *, ..., batch_size=None, progress=...)`
(patching: `(model, clean, corrupted, target=None, *, ...)`). The pieces:
- `targets`: what is explained (a class, `ClassProb`, `LogitDiff`, `ImageTextScore`, a function);
- `backend`: one interface to a model on either backend (run, score a target, restart mid-model);
- `result`: `AnalysisResult` (a tensor with named axes on the patch grid) and `ResultSet`;
- methods: `lens` (patch logit lens), `attribution` (direct logit attribution, CLS attribution),
  `attention` (rollout, gradient-weighted attention), `heads` (head patterns and statistics),
  `captum_attr` (Captum's methods), `faithfulness` (deletion / insertion / perturbation),
  `compare` (several maps scored together), `patching/` (activation, attribution and
  image-text patching);
- `common` and `progress`: what the methods share (image checks, chunking, progress bars);
- `metrics`: the previous release's patching metrics, as targets (deprecated).
The model's readout itself (pooling, final norm, head) is `prisma_ext.hooked.readout.Readout`.
"""
