from unsuperpose.lm import EOT_ID, VOCAB_SIZE, get_tokenizer


def test_gpt2_ids_offline():
    tok = get_tokenizer()
    assert tok("Hello world")["input_ids"] == [15496, 995]
    assert len(tok) == VOCAB_SIZE == 50_257
    assert tok.eos_token_id == EOT_ID == 50_256
    assert tok.decode([15496, 995, EOT_ID]) == "Hello world<|endoftext|>"


def test_tokenizer_is_shared():
    assert get_tokenizer() is get_tokenizer()
