"""Assembly of the ``ppvae`` parser from the command modules.

A command is a module ``ppvae/cli/<command>.py`` with two functions:

- ``add_parser(subparsers) -> argparse.ArgumentParser``: adds ``subparsers.add_parser("<command>",
  help=..., description=...)`` and its options (shared groups are in ``ppvae.cli.options``);
- ``run(args) -> int``: parses nothing more, calls the library, prints, returns the exit code.
  A ``PPVAEError`` it raises is printed as one line with exit code 2 by ``ppvae.cli.main``.

To add a command, write the module and add its name to :data:`COMMANDS` (the order of ``--help``).
"""

from __future__ import annotations

import argparse
import importlib

from ppvae import __version__

COMMANDS = ["train", "evaluate", "sample", "plot", "compare", "anomaly", "denoise", "posterior"]


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (exit code 2) that points at --help."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The ``ppvae`` parser and each command's parser by name; ``args.handler(args)`` runs the
    command ``args.command``."""
    parser = Parser(
        prog="ppvae",
        description="Latent-variable models as Pyro programs: train with SVI, evaluate log p(x) "
        "and the ELBO gap, sample and plot.",
    )
    parser.add_argument("--version", action="version", version=f"ppvae {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    subparsers.required = True
    commands = {}
    for name in COMMANDS:
        module = importlib.import_module(f"ppvae.cli.{name}")
        command = module.add_parser(subparsers)
        command.set_defaults(handler=module.run)
        commands[name] = command
    return parser, commands


def build_parser() -> argparse.ArgumentParser:
    return build_parsers()[0]
