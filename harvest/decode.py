"""A store's token ids back to text, with the tokenizer that made them."""

from __future__ import annotations

from unsuperpose.harvest.store import StoreError


def store_decoder(store):
    """Token ids -> text with the tokenizer of the model the store was harvested from.

    A store records its tokenizer's tag with its corpus (stores from before then are GPT-2's);
    the model directory's tokenizer must still be that one, else its text would be wrong.
    """
    from unsuperpose.lm import ModelError, gpt2_tokenizer, model_tokenizer

    meta = store.metadata
    tag = (meta.get("corpus") or {}).get("tokenizer", gpt2_tokenizer().tag)
    model_dir = meta.get("model_dir")
    try:
        tok = model_tokenizer(model_dir) if model_dir else None
    except ModelError as exc:
        if tag != gpt2_tokenizer().tag:
            raise StoreError(
                f"{store.path}: its tokens are for the tokenizer of {model_dir}, which cannot be "
                f"read now ({exc}); put the model back there to see the text"
            ) from None
        tok = None
    if tok is None:
        tok = gpt2_tokenizer()
    if tok.tag != tag:
        raise StoreError(
            f"{store.path}: its tokens were made by tokenizer {tag}, but {model_dir} now holds "
            f"{tok.tag}; harvest the store again, or restore that model's tokenizer"
        )
    return tok.decode
