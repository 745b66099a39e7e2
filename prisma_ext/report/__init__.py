"""The HTML report (`prisma-ext report`): one self-contained file explaining a model's prediction
on one image, with every section the analysis layer offers.

`build` checks the inputs and runs the sections, `inputs` reads images and targets, `sections`
(prediction, logit lens, attribution, a CLIP's embedding split by head, attention heads) and
`experiments` (activation patching, the Captum comparison) write them, `page` is the
self-contained HTML page.

    from prisma_ext.report import build_report
    report = build_report("builtin:shapes-vit", image="builtin:red-circle", out="report.html")
"""

from .build import DEFAULT_MODEL, DEFAULT_OUT, Report, build_report, check_out, prepare

__all__ = ["DEFAULT_MODEL", "DEFAULT_OUT", "Report", "build_report", "check_out", "prepare"]
