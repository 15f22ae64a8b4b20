"""The ``syntheticct`` command line: one entry point, one module per subcommand.

Each subcommand module has ``add_parser(subparsers)``, which registers the subcommand through
:func:`SyntheticCTLib.cli.main.add_command` and sets ``run(args, report) -> int`` as its default.
Heavy imports (torch, VTK) happen inside ``run`` so that ``--help`` stays fast.
"""

from SyntheticCTLib.cli.main import main

__all__ = ["main"]
