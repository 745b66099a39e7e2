"""The patching metrics of the previous release (`px.metrics.logit_diff` ...): each returns the
equivalent target, with a DeprecationWarning; see `prisma_ext.analysis.metrics`."""

from .analysis.metrics import call_metric, clip_score_diff, logit_diff, target_prob

__all__ = ["call_metric", "clip_score_diff", "logit_diff", "target_prob"]
