"""The command line's entry point: ``taskscheduler queue|server|add|jobs|show|cancel|requeue|info|schedules|health|
flush|watch|dashboard|demo|limit|pause|resume`` (the commands live in group, jobs, cluster and serving), with its exit
codes.

Every flag can also come from ``TASKSCHEDULER_<FLAG>`` (shown in ``--help``). Bad input prints one line on
stderr and exits 2; an unreachable server exits 1.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import click

from ..errors import (
    ConfigurationError,
    EmbeddedServerError,
    InvalidArgumentError,
    JobNotFoundError,
    MissingExtraError,
    ServerUnavailableError,
    TaskSchedulerError,
)
from . import cluster, jobs, serving  # noqa: F401  (each registers its commands on cli)
from .group import EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE, cli, first_line


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point with our exit codes: 2 for bad input, 1 for an unreachable server."""
    try:
        cli.main(args=list(argv) if argv is not None else None, standalone_mode=False, prog_name="taskscheduler")
    except click.exceptions.Abort:
        sys.exit(130)
    except click.NoSuchOption as exc:
        click.echo(f"Error: {_where_it_goes(exc) or exc.format_message()}", err=True)
        sys.exit(EXIT_USAGE)
    except click.ClickException as exc:
        click.echo(f"Error: {exc.format_message()}", err=True)
        sys.exit(EXIT_USAGE)
    except ServerUnavailableError as exc:
        click.echo(f"Error: {first_line(exc)}; is the server running?", err=True)
        sys.exit(EXIT_UNAVAILABLE)
    except MissingExtraError as exc:  # the operator's install: bad input, said with the pip command that fixes it
        click.echo(f"Error: {first_line(exc)}", err=True)
        sys.exit(EXIT_USAGE)
    except (ConfigurationError, EmbeddedServerError) as exc:
        click.echo(f"Error: {first_line(exc)}", err=True)
        sys.exit(EXIT_UNAVAILABLE)
    except (InvalidArgumentError, JobNotFoundError, TaskSchedulerError) as exc:
        click.echo(f"Error: {first_line(exc)}", err=True)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(EXIT_OK)


def _where_it_goes(exc: click.NoSuchOption) -> str | None:
    """For an option of ``taskscheduler`` itself given after a command (``info --log-level DEBUG``): where it goes.
    Click knows the option only where it was declared, so its error alone reads as if it did not exist."""
    for param in cli.params:
        if isinstance(param, click.Option) and exc.option_name in (*param.opts, *param.secondary_opts):
            name = param.opts[0]
            value = " VALUE"
            if param.is_flag:
                value = ""
            elif isinstance(param.type, click.Choice):
                value = f" {param.type.choices[0]}"
            command = exc.ctx.info_name if exc.ctx is not None and exc.ctx.parent is not None else None
            example = f"taskscheduler {name}{value}" + (f" {command}" if command and not param.is_eager else "")
            env = f" (or set {param.envvar})" if isinstance(param.envvar, str) else ""
            where = f" for {command}" if command else ""
            return (
                f"No such option {exc.option_name!r}{where}: it belongs to taskscheduler itself, so put it before "
                f"the command: {example}{env}"
            )
    return None
