"""ctagent command line: thin click front over the ``agent`` package."""

from __future__ import annotations

import sys

import click

from agent import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ctagent")
def main() -> None:
    """ctagent: a Bluetooth LE contact-tracing device agent."""


@main.command()
@click.option("--seed", default=1, show_default=True, help="Seed of the simulated run.")
def demo(seed: int) -> None:
    """Show the whole chain on a machine without Bluetooth."""
    from agent.walkthrough import run_walkthrough

    result = run_walkthrough(seed=seed, log=click.echo)
    if result.matched_rpis == 0:
        click.echo("error: the walk-through found no match", err=True)
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
