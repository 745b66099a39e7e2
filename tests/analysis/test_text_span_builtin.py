"""TextSpan on the built-in CLIP: some heads' bases name colours and others shapes.

The rule: a head is a colour head when all of its first three TextSpan texts are colour prompts
("a red shape", ...), a shape head when all three are shape names ("a circle", ...), over a bank
of 8 colour prompts, 6 shape names and 6 neutral texts. The test asks for at least one head of
each kind and at least three such pure heads of the 16: a search that picked texts at random
would make a head pure with probability (C(8,3) + C(6,3)) / C(20,3) = 6.7%, so three or more
pure heads including both kinds would happen by chance about 2% of the time."""

from __future__ import annotations

import prisma_ext as px
from prisma_ext import zoo
from prisma_ext.data.scenes import COLOURS, SHAPES

COLOUR_TEXTS = [f"a {c} shape" for c in COLOURS]
SHAPE_TEXTS = [f"a {s}" for s in SHAPES]
NEUTRAL = ["a photo", "a picture", "an object", "a thing", "a drawing", "a pattern"]


def test_some_heads_name_colours_and_others_shapes():
    clip = px.load("builtin:shapes-clip")
    scenes = zoo.heldout("shapes-clip", n=200, seed=41)
    span = px.text_span(clip, zoo.normalize(scenes.images, "shapes-clip"), COLOUR_TEXTS + SHAPE_TEXTS + NEUTRAL, k=3)
    kinds = {}
    for head, texts in zip(span.labels("head"), span.meta["texts"]):
        if all(t in COLOUR_TEXTS for t in texts[:3]):
            kinds[head] = "colour"
        elif all(t in SHAPE_TEXTS for t in texts[:3]):
            kinds[head] = "shape"
    assert "colour" in kinds.values() and "shape" in kinds.values(), kinds
    assert len(kinds) >= 3, kinds
