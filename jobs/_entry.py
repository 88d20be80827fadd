"""What every job shares: Hydra errors and user errors end in one line on stderr and exit code 2.

Hydra's own messages for a bad override are several lines; until the task function starts, stderr is
held back and condensed to one line, so `python -m jobs.score batch_size=` fails the same way as
`batch_size=0` does. In a sweep (-m), a run's failure is raised for Hydra (and the Slurm launcher) to
report instead; the command then exits 1.
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
from collections.abc import Callable

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from pipeline.errors import EXIT_FAILED, EXIT_USER_ERROR, OutOfMemoryAtOneRow, UserError
from pipeline.layout import local_logs_dir

SWEEP_RUN_FAILED = "Error executing job with overrides"  # how Hydra reports a failed run of a sweep
CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")

# hydra.run.dir: Hydra writes its logs with plain files, so an s3:// output.dir gets a local log folder.
OmegaConf.register_new_resolver("logs_dir", local_logs_dir, replace=True)


def _rank(rank, world_size) -> int:
    """This process's rank by the rule of pipeline.cluster (dist.* > torchrun > Slurm), for its log folder."""
    from pipeline.cluster import rank_and_world
    from pipeline.settings import DistSettings

    return rank_and_world(DistSettings(rank, world_size))[0]


OmegaConf.register_new_resolver("rank", _rank, replace=True)


def to_plain(cfg: DictConfig, drop: tuple[str, ...] = ("paths", "hydra")) -> dict:
    """The composed config as plain dicts, with every interpolation resolved and every ??? given."""
    plain = {}
    for key in cfg:
        if key in drop:
            continue
        try:
            node = cfg[key]
            plain[key] = OmegaConf.to_container(node, resolve=True, throw_on_missing=True) \
                if OmegaConf.is_config(node) else node
        except MissingMandatoryValue as e:
            missing = getattr(e, "full_key", None) or key
            raise UserError(f"{missing} is required: add {missing}=… to the command line") from None
    return plain


def run_job(task: Callable[[DictConfig], int], config_name: str = "config", verbatim: tuple[str, ...] = (),
            quick_exit: bool = False) -> None:
    """Run `task` under Hydra and exit with its code (2 for user errors, before any work). The values of
    `verbatim` keys (a SQL predicate) are taken as typed, not read by Hydra's override grammar. With
    `quick_exit` (the short commands: select, verify, report), a finished run ends without the
    interpreter's teardown of its modules."""
    started = False

    def main(cfg: DictConfig) -> int:  # runs here, or pickled into a Slurm job by the Hydra launcher
        nonlocal started
        started = True
        _release_stderr()
        from pipeline.layout import arrow_without_pandas

        arrow_without_pandas()
        message = None
        try:
            code = task(cfg)
        except UserError as e:
            code, message = EXIT_USER_ERROR, f"error: {e}"
        except OutOfMemoryAtOneRow as e:
            code, message = EXIT_FAILED, f"error: {e}"
        if multirun():  # a run of a sweep reports through Hydra (and the launcher), never by exiting
            if code:
                raise RuntimeError(message or f"run ended with exit code {code}")
            return code
        if message:
            _fail(message, code)
        if quick_exit:
            _exit_now(code)
        sys.exit(code)

    sys.argv[1:] = [quote_verbatim(a, verbatim) or quote_brace_pattern(a) for a in sys.argv[1:]]
    _compose_once(sys.argv[1:])
    _hold_stderr()
    try:
        hydra.main(config_path=CONF_DIR, config_name=config_name, version_base="1.3")(main)()
    except SystemExit as e:
        if not started and e.code:
            held = _release_stderr(echo=False)
            if SWEEP_RUN_FAILED in held:  # a run of a sweep failed: Hydra's report says which, exit 1
                sys.stderr.write(held)
                sys.exit(EXIT_FAILED)
            _fail(f"error: {_condense(held)}", EXIT_USER_ERROR)
        raise
    except Exception as e:  # Hydra failed to set the run up, e.g. output.dir missing for hydra.run.dir
        if started:
            raise
        _release_stderr(echo=False)
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "Missing mandatory value" in message:
            key = message.rsplit(":", 1)[-1].strip()
            message = f"{key} is required: add {key}=… to the command line"
        _fail(f"error: {message}", EXIT_USER_ERROR)
    finally:
        _release_stderr(echo=False)


def _compose_once(args: list[str]) -> None:
    """Hydra composes the config twice: once only to read `hydra.mode`, then for the run (0.1 s each
    here). No config here sets hydra.mode, so unless the command line does, the mode is the command
    line's (-m or not), which is what Hydra takes when that first compose gives no mode."""
    from hydra._internal.hydra import Hydra

    if hasattr(Hydra, "get_mode") and not any("hydra.mode" in a for a in args):
        Hydra.get_mode = lambda self, config_name, overrides: None


def _exit_now(code: int) -> None:
    """Exit as sys.exit does (output flushed, logging shut down, exit handlers run), less the teardown
    of every module: 0.1 to 0.2 s here, paid by every run of a command that takes a few seconds."""
    import atexit

    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    atexit._run_exitfuncs()
    os._exit(code)


# (real stderr, buffer) while Hydra sets the run up. Module state rather than closure variables, so
# the task function stays picklable for the Slurm launcher; in a launched job there is nothing held.
_held_stderr: tuple | None = None


def _hold_stderr() -> None:
    global _held_stderr
    _held_stderr = (sys.stderr, io.StringIO())
    sys.stderr = _held_stderr[1]


def _release_stderr(echo: bool = True) -> str:
    """Put stderr back; with echo, print what was held. Returns the held text."""
    global _held_stderr
    if _held_stderr is None:
        return ""
    (real, buffer), _held_stderr = _held_stderr, None
    sys.stderr = real
    if echo:
        real.write(buffer.getvalue())
    return buffer.getvalue()


def quote_brace_pattern(arg: str) -> str:
    """`data.shards=/d/{000..099}.tar` as typed in a shell: quote the value so Hydra's override grammar
    takes the braces literally instead of failing on them."""
    key, sep, value = arg.partition("=")
    if not sep or "{" not in value or "${" in value or value[:1] in "'\"[{":
        return arg
    return f"{key}='{value}'" if "'" not in value else f'{key}="{value}"'


def quote_verbatim(arg: str, keys: tuple[str, ...]) -> str | None:
    """`where=score > 5 AND caption LIKE '%dog%'` as typed in a shell: one double-quoted string for Hydra
    that reads back as typed (its double quotes, the backslashes before them or at the end, and `${`
    escaped). None for other arguments; a value already double-quoted for Hydra is left as it is."""
    key, sep, value = arg.partition("=")
    if not sep or key.lstrip("+") not in keys:
        return None
    if len(value) >= 2 and value[0] == value[-1] == '"' and '"' not in value[1:-1].replace('\\"', ""):
        return arg
    value = re.sub(r'(\\*)"', lambda m: m.group(1) * 2 + '\\"', value)
    value = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, value).replace("${", "\\${")
    return f'{key}="{value}"'


def _fail(message: str, code: int) -> None:
    logging.shutdown()
    print(message, file=sys.stderr, flush=True)
    sys.exit(code)


def task_overrides() -> list[str]:
    """The command line's overrides of this run (empty when the config was composed without Hydra's app)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _condense(text: str) -> str:
    """Hydra's multi-line config error as one line (its first paragraph, without the stack-trace hint)."""
    lines = []
    for line in text.splitlines():
        if not line.strip():
            if lines:
                break
            continue
        if "HYDRA_FULL_ERROR" in line or line.startswith((" ", "\t")):
            continue
        lines.append(line.strip())
    return " ".join(lines) or "invalid configuration"
