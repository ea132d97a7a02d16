"""``cache-sidecar``: parse settings, set up logging, run :func:`sidecar.app.serve`."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import sys
from typing import NoReturn

from . import __version__
from .config import ENV_PREFIX, flag_names, load_config, settings_help, unknown_env_names
from .errors import ConfigError, SidecarError

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def _parser() -> argparse.ArgumentParser:
    epilog = "\n".join(f"  {env:<30} default {default}" for _, env, default, _ in settings_help())
    parser = _Parser(
        prog="cache-sidecar",
        description="Coherent local cache sidecar coordinated through ZooKeeper.",
        epilog=f"Every flag is also an environment variable ({ENV_PREFIX}<NAME>):\n{epilog}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"cache-sidecar {__version__}")
    parser.add_argument("--config", metavar="FILE", help="TOML file of settings ([sidecar] table)")
    helps = {name: text for name, _, _, text in settings_help()}
    for name in flag_names():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, metavar="VALUE", help=helps[name])
    return parser


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def _return_large_values_to_the_os() -> None:
    """Give every block of 128 KiB or more its own mapping, unmapped when freed.

    glibc raises its mmap threshold each time such a block is freed, after
    which large values come from the heap, and evicted ones stay there as
    fragments the process cannot return: 600 values of 1 MiB took RSS to
    385 MiB against max_bytes 256 MiB, over the chart's 1.25 x + 64 MiB;
    with a fixed threshold, 328 MiB (issue 14).  Setting it with mallopt
    turns the adjustment off.  Elsewhere than glibc this does nothing.
    """
    try:
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``cache-sidecar`` console script."""
    _return_large_values_to_the_os()
    try:
        args = vars(_parser().parse_args(argv))
        config_file = args.pop("config")
        config = load_config(args, config_file=config_file)
    except ConfigError as exc:
        print(f"cache-sidecar: {exc.detail}", file=sys.stderr)
        sys.exit(2)
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("kazoo.client").setLevel(logging.WARNING)
    if config.zk_tls and not config.zk_tls_verify:
        logging.getLogger("sidecar").warning(
            "zk_tls_verify is off: ZooKeeper's certificate is not checked, anyone in the path can impersonate it"
        )
    for name in unknown_env_names():
        logging.getLogger("sidecar").warning("ignoring %s: no such setting (see cache-sidecar --help)", name)
    try:
        import uvloop  # optional accelerator
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run
    from .app import serve

    try:
        runner(serve(config))
    except ConfigError as exc:
        print(f"cache-sidecar: {exc.detail}", file=sys.stderr)
        sys.exit(2)
    except (OSError, SidecarError) as exc:  # port taken, origin unreadable...
        print(f"cache-sidecar: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
