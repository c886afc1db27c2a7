"""The ``ppvae`` command line (DESIGN §5): a thin layer over :class:`ppvae.Run`.

One module per command (``train.py``, ``evaluate.py``, ``sample.py``, ``plot.py``): each parses its
options, calls the library and prints. ``parser.py`` assembles them and says how a command is
added; ``options.py`` holds the option groups they share. Errors in the user's input print one
line and exit with code 2, before anything is written.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence

import matplotlib

from ppvae.checkpoint import one_line
from ppvae.cli.parser import COMMANDS, build_parser, build_parsers
from ppvae.errors import PPVAEError

__all__ = ["COMMANDS", "build_parser", "build_parsers", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``ppvae ARGV``; returns the exit code (argparse exits itself on bad options)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    matplotlib.use("Agg")  # the command line writes figure files; the library leaves it alone
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning, module="arviz")
    try:
        return args.handler(args)
    except PPVAEError as error:  # on one line, even where it quotes text from the user's files
        print(f"ppvae {args.command}: error: {one_line(error, 4000)}", file=sys.stderr)
        return 2
    except OSError as error:  # a full disk, a read-only folder: what the library did not catch
        where = f" {error.filename}" if error.filename else ""
        print(
            f"ppvae {args.command}: error: cannot read or write{where}: "
            f"{error.strerror or error}; free space or fix permissions",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print(
            f"ppvae {args.command}: interrupted; completed epochs are checkpointed — "
            "continue with 'ppvae train --run-dir RUN --resume'",
            file=sys.stderr,
        )
        return 130
