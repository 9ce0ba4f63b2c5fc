"""What the method stands on, and a reader of it can skip: downloads, GGUF reading, tokenizer and chat formats,
trait files, file I/O, the sampling budget, checkpoint checks, statistics, plots and training infrastructure.
Nothing here imports the files above it (persona_vectors.py, train.py, judge.py, apps/); tests/test_layers.py
keeps it so.

    hub.py           model downloads (huggingface_hub) into the Hugging Face cache, and the offline default model
    gguf_convert.py  a GGUF reader: exact dequantization and conversion to a Hugging Face-layout directory
    tokenizer.py     tokenization and the chat templates (ChatML, Llama-3) written out by hand
    traits.py        trait files: data/traits/*.json, their schema and validation; the pools of everyday requests
    files.py         atomic writes, CSV, the vector files (name, --steer specs, save, load, fit) and conversation files
    sampling.py      the sampling budget (answers, tokens, temperature, batch) and the hash naming a cached run
    checkpoint.py    model directories: config and weight-file checks, the device and dtype defaults, a model's shape
    generation.py    generate and sample on model.py (left padding, per-row stops), its KVCache, and Capture
    stats.py         correlations, permutation p-values, bootstrap intervals, random directions, means with errors
    plots.py         the sweep's and the monitoring experiment's pictures (optional: need matplotlib)
    cli.py           the command line's argument types, and `run` (a UserError as one line)
    cpu_speed.py     the CPU matmul split that model.load_model applies on the CPU (measured in tools/bench.py)
    training.py      around train.py's loop: settings' checks, data order, train.json, checkpoints, resuming, DDP/FSDP2
    capping.py       persona capping's ceiling file, --cap specs and the model.Cap interventions they make
    openai_client.py the judge's transport: an OpenAI-compatible HTTP client (retries) and worker threads
    judge_cache.py   the judge's JSONL cache: every judgment on disk, so a rerun never pays twice
"""


class UserError(ValueError):
    """A problem the user can fix (bad input, a missing file, a wrong flag): the command line prints its message as
    one line and exits 1. Every other exception is a bug and keeps its traceback."""
