"""CLI commands owned by the config/run room (`train`, `params`), plus the shared
config-from-command-line helpers (`configargs`) that any config-driven command can reuse."""
