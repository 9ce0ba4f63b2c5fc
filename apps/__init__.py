"""Applications built on the method (persona_vectors.py): each registers its commands on the command line through
persona_vectors.APP_COMMANDS, and nothing below imports this folder.

    server.py          `serve`: an OpenAI-compatible chat server with per-request steering and persona gauges
    flagging.py        `flag`, `flag-merge`: ΔP over training datasets at scale (streamed, resumable, sharded)
    control_vector.py  `export-gguf`, `import-gguf`: persona vectors as llama.cpp control vectors, and back
    capping.py         `calibrate-cap`: the ceilings of persona capping, from the model's own everyday answers
"""
