"""The `qconvert` command: a thin shell over the pipeline stages.

Each subcommand lives in its own module (parse → call → render). `main` turns every error into one line
on stderr and an exit code: 0 ok, 1 runtime failure, 2 usage or bad input. `--debug` or
QCONVERT_DEBUG=1 shows the traceback instead.
"""

from __future__ import annotations

import os
import sys

import typer

from qconvert import __version__
from qconvert.cli.calibrate import calibrate_command
from qconvert.cli.convert import convert_command
from qconvert.cli.eval import eval_command
from qconvert.cli.imatrix import imatrix_command
from qconvert.cli.inspect import inspect_command
from qconvert.cli.quantize import quantize_command
from qconvert.errors import EXIT_FAILURE, EXIT_USAGE, QConvertError

try:  # recent typer vendors its own click
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover - older typer uses click itself
    from click import ClickException

app = typer.Typer(
    name="qconvert",
    help="Quantize and convert LLM checkpoints: GGUF for llama.cpp, packed safetensors for vLLM / SGLang / "
    "transformers (GPTQ, AWQ, compressed-tensors).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"qconvert {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show Python tracebacks (also QCONVERT_DEBUG=1)."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    if debug:
        os.environ["QCONVERT_DEBUG"] = "1"


app.command("inspect")(inspect_command)
app.command("convert")(convert_command)
app.command("quantize")(quantize_command)
app.command("calibrate")(calibrate_command)
app.command("imatrix")(imatrix_command)
app.command("eval")(eval_command)


def _debug() -> bool:
    return os.environ.get("QCONVERT_DEBUG", "") not in ("", "0")


def _fail(message: str, code: int) -> None:
    sys.stdout.flush()
    print(f"qconvert: error: {message}", file=sys.stderr)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    args = sys.argv[1:] if argv is None else argv
    if "--debug" in args:
        os.environ["QCONVERT_DEBUG"] = "1"
    try:
        app(args=args, prog_name="qconvert", standalone_mode=False)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        _fail("interrupted", 130)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except ClickException as e:
        if _debug():
            raise
        if type(e).__name__ == "NoArgsIsHelpError":  # bare `qconvert CMD`: the help is the answer
            e.show()
            sys.exit(EXIT_USAGE)
        hint = f" (see '{e.ctx.command_path} --help')" if getattr(e, "ctx", None) else ""
        _fail(e.format_message().replace("\n", " ") + hint, EXIT_USAGE)
    except QConvertError as e:
        if _debug():
            raise
        _fail(str(e), e.exit_code)
    except MemoryError:
        if _debug():
            raise
        _fail("out of memory", EXIT_FAILURE)
    except OSError as e:
        if _debug():
            raise
        where = f"{e.filename}: " if e.filename else ""
        _fail(f"{where}{e.strerror or e}", EXIT_FAILURE)
    except Exception as e:  # noqa: BLE001 - last line of defence: one line, not a traceback
        if _debug():
            raise
        _fail(f"internal error: {type(e).__name__}: {e} (run with --debug for the traceback)", EXIT_FAILURE)
    sys.exit(0)
