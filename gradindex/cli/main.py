"""The ``gradindex`` group: every command attached to it, and the one place where errors
become output. Each command opens the library object, calls it and prints; every
``GradIndexError`` becomes a one-line ``Error: ...`` and exit code 1 here (``_Group.invoke``),
warnings become ``Warning: ...`` lines, and Ctrl-C says what it left behind.
"""

from __future__ import annotations

import warnings
from typing import Any

import click

try:  # the commands' options load torch: a Ctrl-C in those seconds started nothing
    from gradindex.cli.app_commands import demo, export, serve
    from gradindex.cli.index_commands import add, build, factors, kernel, merge
    from gradindex.cli.query_commands import info, query, report
    from gradindex.errors import GradIndexError, first_line
except KeyboardInterrupt:
    raise SystemExit("Error: interrupted before the command started; nothing was written") from None


class _Group(click.Group):
    """The group whose ``invoke`` turns library errors into one ``Error:`` line."""

    def invoke(self, ctx: click.Context) -> Any:
        """Run the subcommand; warnings, project errors, OS errors and Ctrl-C become lines."""
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", UserWarning)
                try:
                    return super().invoke(ctx)
                finally:
                    for w in caught:
                        if not str(w.message).startswith("There is a performance drop"):
                            click.echo(f"Warning: {w.message}", err=True)
        except GradIndexError as exc:
            raise click.ClickException(first_line(exc)) from None
        except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
            raise click.ClickException(f"{exc.filename}: {exc.strerror}") from None
        except OSError as exc:
            raise click.ClickException(f"{exc.strerror or exc}") from None
        except KeyboardInterrupt:
            hint = _INTERRUPTED.get(ctx.invoked_subcommand or "")
            raise click.ClickException("interrupted" + (f"; {hint}" if hint else "")) from None


# what a Ctrl-C leaves, by command (a killed build keeps its committed rows; add / merge swap
# the new index in only when it is complete)
_INTERRUPTED = {
    "build": "the rows written so far are kept: run the same command with --resume to finish",
    "add": "the index is as it was before the add",
    "merge": "nothing was replaced; run the merge again",
}


@click.group(cls=_Group)
@click.version_option(package_name="gradindex")
def main() -> None:
    """gradindex: a vector-search index for training-data attribution in diffusion models.

    Build once (per-sample gradients at fixed timesteps and noise draws, projected and stored),
    then ask which training images made the model produce an image, by Diffusion-TracIn or
    Diffusion-ReTrac score, in milliseconds.

    \b
    Start with:  gradindex demo --out demo_out
    """


for command in (build, add, merge, kernel, factors, query, info, report, export, serve, demo):
    main.add_command(command)
