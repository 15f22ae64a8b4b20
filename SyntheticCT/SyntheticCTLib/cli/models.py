"""``syntheticct models``: list, add, fetch, verify and remove models; add institution catalogs."""

from __future__ import annotations

import argparse
import json
import sys

from SyntheticCTLib.cli.options import add_command

ACTIONS = ("list", "add", "add-catalog", "fetch", "verify", "remove", "path", "clear")


def _sub_options() -> argparse.ArgumentParser:
    """Options accepted after the action too (``models fetch NAME --progress json``)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--cache-dir",
        dest="cache_dir_action",
        default=None,
        metavar="DIR",
        help="model cache folder (default: $SYNTHETICCT_HOME or the platform's user cache folder)",
    )
    common.add_argument(
        "--progress",
        choices=("bar", "json", "none"),
        default=argparse.SUPPRESS,
        help="progress as a bar, JSON lines on stdout, or none",
    )
    common.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"), default=argparse.SUPPRESS, help="logging level"
    )
    return common


def add_parser(subparsers) -> None:
    p = add_command(
        subparsers,
        "models",
        help="list, add, download, verify and remove synthesis models",
        description="Manage the model catalog and the per-user model cache.\n\n"
        "  syntheticct models list [--json]\n"
        "  syntheticct models add SOURCE [--sha256 HEX] [--name NAME]   (URL, .zip or folder)\n"
        "  syntheticct models add-catalog URL        (an institution's catalog.json)\n"
        "  syntheticct models fetch NAME | verify NAME | remove NAME\n"
        "  syntheticct models path                   (print the cache folder)\n"
        "  syntheticct models clear [--all]          (delete downloaded models)",
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        metavar="DIR",
        help="model cache folder (default: $SYNTHETICCT_HOME or the platform's user cache folder)",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    parent = [_sub_options()]
    q = actions.add_parser("list", parents=parent, help="list the models of every catalog, with their status")
    q.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    q = actions.add_parser("add", parents=parent, help="add a model from a URL, a .zip or a folder")
    q.add_argument("source", metavar="SOURCE", help="https/http/file URL of a .zip, a local .zip, or a model folder")
    q.add_argument("--sha256", default=None, metavar="HEX", help="expected SHA-256 (required for a URL)")
    q.add_argument("--name", default=None, help="catalog name (default: the package's own name)")
    q = actions.add_parser("add-catalog", parents=parent, help="add (or refresh) a catalog hosted at a URL")
    q.add_argument("url", metavar="URL")
    q.add_argument("--sha256", default=None, metavar="HEX", help="expected SHA-256 of the catalog file")
    for name, text in (
        ("fetch", "download a model into the cache (if not there already)"),
        ("verify", "re-hash a model's files against its model.json"),
        ("remove", "delete a model from the cache (and a user-added one from the catalog)"),
    ):
        q = actions.add_parser(name, parents=parent, help=text)
        q.add_argument(
            "name",
            metavar="NAME",
            help="a catalog name ('default' for the bundled model)"
            + (", a folder or a .zip" if name == "verify" else ""),
        )
    actions.add_parser("path", parents=parent, help="print the cache folder")
    q = actions.add_parser("clear", parents=parent, help="delete downloaded models and temporary files")
    q.add_argument("--all", action="store_true", help="empty the whole cache, user catalog included")
    p.set_defaults(run=run, _models_parser=p)


def _table(entries) -> str:
    rows = [("NAME", "VERSION", "STATUS", "SOURCE", "DESCRIPTION")]
    for e in entries:
        description = e.description if len(e.description) <= 60 else e.description[:57] + "..."
        rows.append((e.name, e.version, e.status, e.source, description))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows)


def run(args, report) -> int:
    from SyntheticCTLib.models import catalog
    from SyntheticCTLib.models.cache import cache_dir

    if not getattr(args, "action", None):
        args._models_parser.print_help(sys.stderr)
        return 2
    root = cache_dir(getattr(args, "cache_dir_action", None) or args.cache_dir)
    action = args.action
    if action == "path":
        print(root)
    elif action == "list":
        entries = catalog.list_models(root)
        if args.json:
            print(json.dumps([e.to_dict(with_status=True) for e in entries], indent=2))
        else:
            print(_table(entries))
    elif action == "add":
        entry = catalog.add_model(args.source, sha256=args.sha256, name=args.name, cache_dir=root, progress=report)
        print(f"Added '{entry.name}' {entry.version} ({entry.status}): {entry.local_path}")
    elif action == "add-catalog":
        entries = catalog.add_catalog(args.url, sha256=args.sha256, cache_dir=root, progress=report)
        print(f"Added catalog {args.url} with {len(entries)} model(s): {', '.join(e.name for e in entries)}")
    elif action == "fetch":
        package = catalog.resolve_model(args.name, download=True, cache_dir=root, progress=report)
        print(f"{package.name} {package.version}: {package.root}")
    elif action == "verify":
        result = catalog.verify_model(args.name, cache_dir=root)
        n_bytes = sum(f["bytes"] for f in result["files"])
        print(
            f"OK: '{result['name']}' {result['version']}: {len(result['files'])} weight file(s), {n_bytes} bytes, "
            f"SHA-256 verified ({result['path']})"
        )
    elif action == "remove":
        removed = catalog.remove_model(args.name, cache_dir=root)
        print(f"Removed '{args.name}'" + (": " + ", ".join(str(p) for p in removed) if removed else "."))
    elif action == "clear":
        freed = catalog.clear_cache(root, everything=args.all)
        print(f"Freed {freed / 1e6:.1f} MB in {root}")
    return 0
