"""Applications built on the method (persona_vectors.py), started with `python -m apps COMMAND ...`
(apps/__main__.py): each registers its commands there with add_commands(sub); nothing below imports
this folder.

    monitor.py         `monitor`: each assistant turn of a conversation file along each persona
                       vector; the gauges
    chat.py            `chat`: a multi-turn chat, optionally steered, with a persona gauge after
                       each reply
    new_trait.py       `generate-trait`: a new trait file written by an LLM
    server.py          `serve`: an OpenAI-compatible chat server with per-request steering and
                       persona gauges
    flagging.py        `flag`, `flag-merge`: ΔP over training datasets at scale (streamed,
                       resumable, sharded)
    control_vector.py  `export-gguf`, `import-gguf`: persona vectors as llama.cpp control vectors,
                       and back; `import-vector`: the official repository's .pt vector files
    capping.py         `calibrate-cap`: the ceilings of persona capping, from the model's own
                       everyday answers
"""
