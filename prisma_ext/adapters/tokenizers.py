"""Prompt tokenizers of the CLIP adapters: open_clip's (offline BPE, or the hub's) and the Hugging Face
CLIPTokenizer saved with a model."""

from __future__ import annotations

from collections.abc import Callable

from ..errors import PrismaError


def open_clip_tokenizer(arch: str | None, context_length: int) -> Callable:
    """open_clip's tokenizer for an architecture (its own BPE ships offline; tokenizers that live
    on the Hugging Face hub need the hub). Unknown or missing: the OpenAI CLIP BPE tokenizer."""
    import open_clip

    if arch is None:
        return open_clip.SimpleTokenizer(context_length=context_length)
    try:
        return open_clip.get_tokenizer(arch, context_length=context_length)
    except Exception as err:  # the hub is out of reach, or the tokenizer package is missing
        raise PrismaError(f"open_clip's tokenizer for {arch} could not be loaded ({type(err).__name__}: "
                          f"{err}); pass token ids to encode_text instead") from err


def hf_tokenizer(path: str, kind: str = "CLIPTokenizer") -> Callable | None:
    """A `fn(texts, context_length=...)` over the tokenizer saved with a model (transformers'
    `kind`, e.g. "AutoTokenizer"; local files only), padding to the context; None when none is
    saved. `fn.pad_id` is its padding id."""
    try:
        import transformers

        tok = getattr(transformers, kind).from_pretrained(path, local_files_only=True)
    except Exception:  # no tokenizer files next to the model
        return None

    def fn(texts, context_length):
        return tok(texts, padding="max_length", truncation=True, max_length=context_length,
                   return_tensors="pt").input_ids

    fn.pad_id = tok.pad_token_id
    return fn
