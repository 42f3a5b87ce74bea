"""`lorakit params [CONFIG] [overrides]`: apply a method to a model, print what would train."""
from __future__ import annotations

import argparse

from lorakit.commands.configargs import add_config_arguments, config_from_args

ACCEPTS_EXTRA_ARGS = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Same config and overrides as `lorakit train`; only the model and method sections matter."""
    parser.description = ("Load the config's model, apply its method and print the trainable-parameter "
                          "report (nothing is trained). Takes the same config and overrides as `lorakit train`.")
    parser.epilog = "example:\n  lorakit params --method.r 8 --method.targets '[q_proj, v_proj]'\n"
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Print the parameter report of the config's model with its method applied."""
    from lorakit.run import load_adapted_model

    cfg, _ = config_from_args(args)
    load_adapted_model(cfg, print)
    return 0
