"""Moved to `prisma_ext.sitemaps.spec` (this path works for one more release, with a DeprecationWarning)."""

from .._deprecated import moved

__getattr__ = moved(__name__, "prisma_ext.sitemaps.spec")
