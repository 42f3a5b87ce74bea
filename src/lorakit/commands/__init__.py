"""Every `lorakit` command: one module each with `add_arguments(parser)` and `run(args)`, registered in
cli.COMMANDS; the command-line helpers they share (`configargs`: config files and dotted overrides,
`inputs`: models, adapters, prompts and decoding options). Commands are the top floor: they call
the rooms below and hold no library code of their own.

This is lorakit's one import boundary: a command module imports only torch-free modules at its top
(the config classes, `schema`, `configargs`, `inputs`) and the rooms it drives (torch, transformers,
datasets, matplotlib) inside `run()` and its helpers, so `lorakit CMD --help` never loads them.
Elsewhere an import inside a function is kept only for an optional dependency (bitsandbytes,
fastapi/uvicorn, a torch API newer than the oldest torch lorakit supports)."""
