"""Every example in README.md and docs/ runs as written.

Each ```python block is a complete program: it runs in a fresh interpreter,
in an empty folder, and must exit 0 within `EXAMPLE_TIMEOUT_S`. Each ```sh
block runs under ``bash -euo pipefail`` the same way, with the ``blobplane``
command on PATH. A block that talks to a broker (``connect_broker``, or any
shell block) gets one of its own: a real ``blobplane serve`` in a private
folder, named by ``$BLOBPLANE_BROKER``, stopped and checked after the block.

An HTML comment on the line before a block changes that:

- ``<!-- docs-test: broker ARGS -->`` starts the block's broker with ARGS
  (``--require-token``, say);
- ``<!-- docs-test: skip REASON -->`` does not run a shell block (one that
  installs packages or runs until Ctrl-C); Python blocks cannot be skipped.

The error page must name every error class, and the performance tables must
be what bench/report.py makes of the JSON they name.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import blobplane.errors
from blobplane.objects import UnpicklingRefused
from brokers import running_broker

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
EXAMPLE_TIMEOUT_S = 60
FENCE = re.compile(r"^```(\w*)\s*$")
MARKER = re.compile(r"^<!-- docs-test: (skip|broker)\b\s*(.*?)\s*-->$")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    marker: str  # "", "skip" or "broker"
    argument: str

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def needs_broker(self) -> bool:
        return self.marker == "broker" or self.language == "sh" or "connect_broker" in self.code


def blocks(page: Path) -> list[Block]:
    """The ```python and ```sh blocks of *page*, with the marker on the line before each."""
    found: list[Block] = []
    lines = page.read_text(encoding="utf-8").splitlines()
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        start = index
        index += 1
        while index < len(lines) and not lines[index].startswith("```"):
            index += 1
        language = opening.group(1)
        if language in ("python", "sh"):
            before = lines[start - 1].strip() if start else ""
            marker = MARKER.match(before)
            found.append(
                Block(
                    page,
                    start + 1,
                    language,
                    "\n".join(lines[start + 1 : index]) + "\n",
                    marker.group(1) if marker else "",
                    marker.group(2) if marker else "",
                )
            )
        index += 1
    return found


EXAMPLES = [block for page in PAGES for block in blocks(page)]


def run_block(block: Block, folder: Path, broker_socket: str | None) -> None:
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.pop("BLOBPLANE_TOKEN", None)
    if broker_socket is not None:
        env["BLOBPLANE_BROKER"] = broker_socket
    if block.language == "python":
        script = folder / "example.py"
        script.write_text(block.code, encoding="utf-8")
        command = [sys.executable, str(script)]
    else:
        command = ["bash", "-euo", "pipefail", "-c", block.code]
    try:
        result = subprocess.run(
            command,
            cwd=folder,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=EXAMPLE_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        said = "".join(_text(part) for part in (exc.output, exc.stderr))
        pytest.fail(f"{block.name} ran longer than {EXAMPLE_TIMEOUT_S} s\n{said}")
    assert result.returncode == 0, (
        f"{block.name} exited with status {result.returncode}\n"
        f"--- code\n{block.code}--- stdout\n{result.stdout}--- stderr\n{result.stderr}"
    )


def _text(output: str | bytes | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


@pytest.mark.parametrize("block", EXAMPLES, ids=[block.name for block in EXAMPLES])
def test_example_runs(block: Block, tmp_path: Path) -> None:
    if block.marker == "skip":
        assert block.language == "sh", f"{block.name}: every Python example must run"
        pytest.skip(block.argument or "marked not to run")
    if not block.needs_broker:
        run_block(block, tmp_path, None)
        return
    with running_broker(*block.argument.split()) as broker:
        run_block(block, tmp_path, broker.socket_path)


def test_every_page_has_examples_found() -> None:
    """The parser sees the blocks (a changed fence style would silently test nothing)."""
    assert len([b for b in EXAMPLES if b.language == "python"]) >= 20
    assert any(b.page.name == "README.md" for b in EXAMPLES)


def test_every_error_is_documented() -> None:
    """docs/errors.md names every public error class, each in a heading of its own."""
    text = (ROOT / "docs" / "errors.md").read_text(encoding="utf-8")
    headings = set(re.findall(r"^#+ `(\w+)`", text, flags=re.MULTILINE))
    classes = {
        name
        for name, value in vars(blobplane.errors).items()
        if isinstance(value, type) and issubclass(value, blobplane.errors.BlobError)
    }
    classes.add(UnpicklingRefused.__name__)
    missing = sorted(classes - headings)
    assert not missing, f"docs/errors.md has no section for {', '.join(missing)}"


def test_performance_tables_are_current() -> None:
    """The tables in the docs are what bench/report.py makes of the JSON they name."""
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "report.py"),
            "--write",
            str(ROOT / "docs" / "performance.md"),
            str(ROOT / "README.md"),
            str(ROOT / "docs" / "guide" / "spilling.md"),
            "--check",
        ],
        capture_output=True,
        text=True,
        timeout=EXAMPLE_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stderr
