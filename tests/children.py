"""Running real child processes in tests: Python snippets with inherited fds."""

from __future__ import annotations

import subprocess
import sys
import textwrap

CHILD_TIMEOUT_S = 60


def run_python(
    code: str, *args: str, pass_fds: tuple[int, ...] = (), timeout: float = CHILD_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    """Run *code* in a fresh interpreter, handing it *pass_fds*; fail the test on error."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        pass_fds=pass_fds,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        raise AssertionError(
            f"child exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
    return result
