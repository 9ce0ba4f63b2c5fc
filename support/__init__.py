"""Support code the method needs but a reader of it can skip: downloads, GGUF conversion, tokenizer and chat
formats, trait files, and file I/O.

    hub.py           model downloads into the Hugging Face cache layout, and the offline default model
    gguf_convert.py  a GGUF reader: exact dequantization and conversion to a Hugging Face-layout directory
    tokenizer.py     tokenization and the chat templates (ChatML, Llama-3) written out by hand
    traits.py        trait files: data/traits/*.json, their schema and validation
    files.py         atomic writes, CSV, and the vector files (name, save, load, fit to a model)
"""


class UserError(ValueError):
    """A problem the user can fix (bad input, a missing file, a wrong flag): the command line prints its message as
    one line and exits 1. Every other exception is a bug and keeps its traceback."""
