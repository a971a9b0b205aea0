"""The `aim-ds` console script: one subcommand per module.

Adding a subcommand: write a module with
    HELP = "one line"
    def add_arguments(parser): ...          # argparse arguments (keep heavy imports out of module level)
    def run(args) -> int: ...               # exit status; raise ValueError (or a subclass) for bad input
and add one line to SUBCOMMANDS below. A ValueError from run() is printed as one clear error line
(`aim-ds NAME: error: ...`, exit status 2), not a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> module (imported lazily: `aim-ds --help` stays fast and one broken command cannot break the others)
SUBCOMMANDS: dict[str, str] = {
    "estimate-memory": "aim_ds.tools.estimate",
    "convert": "aim_ds.checkpoint:ConvertCommand",  # "module:attr": an object with HELP/add_arguments/run
    "reshard": "aim_ds.checkpoint:ReshardCommand",
    "replay": "aim_ds.tools.replay",
}


def build_parser(names: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aim-ds", description="AimMerging for DeepSpeed (ZeRO stages 0-3, tensor parallelism): utilities."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in SUBCOMMANDS.items():
        if names is not None and name not in names:
            sub.add_parser(name, help=f"(see aim-ds {name} --help)", add_help=False)
            continue
        module_name, _, attr = module_name.partition(":")
        module = importlib.import_module(module_name)
        module = getattr(module, attr) if attr else module
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # only import the module of the command actually run (others may need packages this one doesn't)
    chosen = [a for a in argv if a in SUBCOMMANDS][:1]
    parser = build_parser(chosen if chosen else None)
    args = parser.parse_args(argv)
    module = getattr(args, "_module", None)
    if module is None:  # pragma: no cover - argparse already rejected it
        parser.error(f"unknown command {args.command!r}")
    try:
        return int(module.run(args) or 0)
    except ValueError as e:
        print(f"aim-ds {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
