"""`python tests/cli_cases.py <module> <json list of argument lists>`: runs `python -m <module> args…` once
per argument list, all in this one process (the same entry, Hydra's parsing and error handling included;
one interpreter start-up instead of one per case). Prints one JSON line per case: exit code and stderr."""

import io
import json
import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    module, cases = sys.argv[1], json.loads(sys.argv[2])
    from hydra.core.global_hydra import GlobalHydra

    for args in cases:
        sys.argv = [module, *args]
        held, sys.stderr = sys.stderr, io.StringIO()
        code = 0
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        finally:
            stderr, sys.stderr = sys.stderr.getvalue(), held
            GlobalHydra.instance().clear()
        sys.stdout.write(json.dumps({"code": code, "stderr": stderr}) + "\n")


if __name__ == "__main__":
    main()
