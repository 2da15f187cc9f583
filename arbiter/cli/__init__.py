"""`arbiter`: the command line, and the one composition root that may import every package.

The root app is assembled here from one module per command group. A new group is one module with its own
`app = typer.Typer(...)` and one `app.add_typer(<module>.app, name=...)` line below."""

from __future__ import annotations

import logging
import os
import signal
import sys

import pydantic
import typer

from arbiter.batch import batch_command
from arbiter.cli import bench, cache, jobs, keys, queues, run
from arbiter.cli.common import fail
from arbiter.cli.help import App
from broker.client import redis_unavailable
from broker.errors import ArbiterError, InvalidJob

try:  # typer >= 0.20 vendors click
    from typer._click.exceptions import ClickException as _ClickException
except ImportError:  # pragma: no cover - older typer uses click itself
    from click.exceptions import ClickException as _ClickException

app = App(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Arbiter: a GPU job broker with priority queues, quality budgets and preemption.")

# the top-level commands, in the order `arbiter --help` lists them
app.command()(run.worker)
app.command()(run.beat)
app.command()(jobs.submit)
app.command()(jobs.result)
app.command()(jobs.cancel)
app.command("status")(jobs.status_cmd)
app.command()(jobs.gpus)
app.command()(run.dev)
app.command()(run.demo)
app.command()(run.gateway)
app.command("batch")(batch_command)
# the command groups
app.add_typer(keys.app, name="keys")
app.add_typer(cache.app, name="cache")
app.add_typer(bench.app, name="bench")
app.add_typer(queues.app, name="queue")
app.add_typer(queues.job_app, name="job")


def setting_error(exc: pydantic.ValidationError) -> str:
    """A settings error in one line, naming the environment variable and what is allowed."""
    parts = []
    for e in exc.errors():
        name = "ARBITER_" + "_".join(str(x) for x in e["loc"]).upper()
        parts.append(f"{name}={e.get('input')!r}: {e['msg']}" if "input" in e else f"{name}: {e['msg']}")
    return "invalid setting " + "; ".join(parts)


def main() -> None:
    """Entry point: every error is one line on stderr; exit 2 for bad input, 1 for other failures."""
    import redis

    logging.basicConfig(level=os.environ.get("ARBITER_LOG_LEVEL", "WARNING"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # A process started in the background by a non-interactive shell inherits SIGINT as ignored, and Python
    # then never raises KeyboardInterrupt: Ctrl-C (or `kill -INT`) must always stop `arbiter dev` cleanly.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code = app(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        sys.exit(130)
    except _ClickException as exc:  # bad flags or arguments
        fail(exc.format_message(), exc.exit_code)
    except InvalidJob as exc:
        fail(str(exc), 2)
    except pydantic.ValidationError as exc:   # a setting from the environment or .env (`broker.settings`)
        fail(setting_error(exc), 2)
    except ValueError as exc:                 # a setting that parses but cannot work (a Sentinel URL naming no primary)
        fail(str(exc), 2)
    except RuntimeError as exc:               # a process of the stack that cannot start (the embedded Redis)
        fail(str(exc), 1)
    except redis.RedisError as exc:   # read outside the client's calls (status): in the client's words
        fail(str(redis_unavailable(exc)), 1)
    except (ArbiterError, ConnectionError, OSError) as exc:
        fail(str(exc), 1)
