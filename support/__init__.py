"""What the method stands on, and a reader of it can skip: downloads, GGUF reading, tokenizer and
chat formats, trait files, file I/O, the sampling budget, checkpoint checks, statistics, plots and
training infrastructure. Nothing here imports the files above it (persona_vectors.py, train.py,
judge.py, apps/); tests/test_layers.py keeps it so.

    hub.py           model downloads (huggingface_hub) into the Hugging Face cache, and the offline
                     default model
    gguf_convert.py  a GGUF reader: exact dequantization and conversion to a Hugging Face-layout
                     directory
    tokenizer.py     tokenization and the chat formats: each model's own Jinja template, sandboxed
    traits.py        trait files: data/traits/*.json, their schema and validation; the pools of
                     everyday requests
    files.py         atomic writes, CSV, the vector files (name, --steer specs, save, load, fit) and
                     conversation files
    sampling.py      the sampling budget (answers, tokens, temperature, batch), --max-new-tokens
                     against the context, and the hash naming a cached run
    records.py       the pipelines' bookkeeping: cached batches, settings, vector metadata, CSVs,
                     summaries
    checkpoint.py    `load`: a model and tokenizer by hub id or path, config, weights and device
                     checked first
    stats.py         correlations, permutation p-values, bootstrap intervals, random directions,
                     means with errors
    plots.py         the sweep's and the monitoring experiment's pictures
                     (optional: need matplotlib)
    cli.py           the command line's argument types, shared flags and help, and `run`
                     (a UserError as one line)
    limits.py        every numeric range and length limit of the command line, in one table
    cpu_speed.py     the CPU matmul split that checkpoint.load_model applies
                     (measured in tools/bench.py)
    training.py      around train.py's loop: settings' checks, data order, train.json, checkpoints,
                     resuming, DDP/FSDP2
    capping.py       persona capping's ceiling file, --cap specs and the model.Cap interventions
                     they make
    openai_client.py the judge's transport: an OpenAI-compatible HTTP client (retries) and worker
                     threads
    judge_cache.py   the judge's JSONL cache: every judgment on disk, so a rerun never pays twice
"""

# UserError, a problem the user can fix, is one class, defined in model.py so that it copies alone
from model import UserError  # noqa: F401
