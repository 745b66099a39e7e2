"""Patching metrics (`from prisma_ext.metrics import logit_diff`): see prisma_ext.analysis.metrics."""

from .analysis.metrics import call_metric, clip_score_diff, logit_diff, target_prob

__all__ = ["call_metric", "clip_score_diff", "logit_diff", "target_prob"]
