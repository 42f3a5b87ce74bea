"""Every `lorakit` command: one module each with `add_arguments(parser)` and `run(args)`, registered in
cli.COMMANDS; the command-line helpers they share (`configargs`: config files and dotted overrides,
`inputs`: models, adapters, prompts and decoding options). Commands are the top floor: they call
the rooms below and hold no library code of their own."""
