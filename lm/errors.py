"""The lm stage's errors: ValueErrors that say, in the stage's terms, what is wrong and what to
do. The command line catches them and adds its flags (``commands/lm.py``)."""


class ModelError(ValueError):
    """A model directory, hub name or tokenizer that cannot be used as asked."""


class CorpusError(ValueError):
    """A corpus that cannot be read, or holds too little for what is asked of it."""


class RunExists(ValueError):
    """The output folder holds another run: a finished model, or a checkpoint made otherwise."""
