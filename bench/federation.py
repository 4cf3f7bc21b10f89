"""Benchmark of federation: a client of broker B gets a key that lives at broker A.

Run it with `.venv/bin/python bench/federation.py [--quick] [--json PATH]`. It
starts its own brokers (`blobplane serve` on temporary sockets, one shared key
file, Flight on 127.0.0.1): A, and B with A as its peer; and, for the TLS
rows, a second pair with mutual TLS (certificates made with `openssl`; the
rows are left out without it). Variants:

- ``remote get (B fetches from A)``: a client of B calls ``get(key)`` for a
  key that only A holds and closes the mapping; B fetches the blob from A
  over Flight into a memfd it allocates, seals it and answers with an fd.
  Timed from the call until the mapping is in the client's hands. The copy
  at B is deleted after each run, untimed, so every run fetches again.
- ``remote get over mutual TLS``: the same between the TLS pair.
- ``cached get at B`` and ``local get at B``: a get of a key B already holds
  a copy of, against a get of a blob of the same size put at B: both local,
  both answered by the same broker, in turn.
- ``raw TCP, one stream``: a helper process sends the same bytes with
  `sendfile` from a memfd over one loopback TCP connection; this process
  receives them with `recv_into` into a buffer pre-faulted before the clock.
  ``raw TCP, buffer allocated on the clock`` (info) allocates and pre-faults
  that buffer inside the timing, as B must for its copy.
- ``bare Flight DoGet``: a plain `pyarrow.flight` server (no broker, no
  token) streams the same bytes from a memfd mapping in 8 MiB batches; the
  client reads every batch and copies nothing.
- 4 parallel: four keys got at once by four clients of B, against four TCP
  streams at once (each into its own pre-faulted buffer; and, for
  information, each into a buffer allocated and faulted in on the clock).

Each round runs every variant once, in a new seeded random order; medians.
Ratios are against raw TCP into a pre-faulted buffer. Targets: a remote
1 GiB get at >= 80% of raw TCP, 4 parallel at >= 70% of 4-stream TCP, TLS
at >= 50% of raw TCP, a 4 KiB remote get at <= 1 ms median, and a cached get
within 1.5x of a local one. Compare variants within one run, never across.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

from _common import GIB, KIB, MIB, Result, environment, fmt_size, fmt_time
from blobplane.broker.process import BrokerProcess, start_broker
from blobplane.client import BrokerClient, connect_broker

REMOTE = "remote get (B fetches from A)"
REMOTE_TLS = "remote get over mutual TLS"
CACHED = "cached get at B"
LOCAL = "local get at B (a blob put at B)"
TCP = "raw TCP, one stream"
TCP_ALLOCATING = "raw TCP, buffer allocated on the clock (info)"
FLIGHT = "bare Flight DoGet"
PARALLEL = "4 parallel remote gets"
TCP_PARALLEL = "raw TCP, 4 streams"
TCP_PARALLEL_ALLOCATING = "raw TCP, 4 streams, buffers allocated on the clock (info)"

SMALL = 4 * KIB
DEFAULT_PLAN: dict[int, int] = {SMALL: 201, 64 * MIB: 15, 1 * GIB: 11}  # runs vary by 20%: many
QUICK_PLAN: dict[int, int] = {SMALL: 21, 16 * MIB: 3}
# A cached or local get maps the blob and moves no byte: 0.08 to 0.15 ms at any size, so it
# is timed as often as the smallest size's gets, however few runs a large transfer gets.
CACHED_RUNS = DEFAULT_PLAN[SMALL]
QUICK_CACHED_RUNS = QUICK_PLAN[SMALL]
PARALLEL_SIZE = 256 * MIB
QUICK_PARALLEL_SIZE = 16 * MIB
PARALLEL_ROUNDS = 9
QUICK_PARALLEL_ROUNDS = 2
STREAMS = 4
CHUNK = 8 * MIB

REMOTE_TARGET = 0.80  # remote 1 GiB get / raw TCP
PARALLEL_TARGET = 0.70  # 4 parallel remote gets / 4-stream TCP
TLS_TARGET = 0.50  # remote get over TLS / raw TCP
SMALL_TARGET_NS = 1_000_000  # 4 KiB remote get, median
CACHED_TARGET = 1.5  # cached get / local get, at most
TARGET_SIZE = 1 * GIB

REQUEST = struct.Struct("<QQ")  # offset, length: what a TCP helper sends


# --------------------------------------------------------------------------- helpers


def pattern_memfd(size: int) -> int:
    """A memfd of *size* bytes of a fixed pattern, every page allocated."""
    fd = os.memfd_create("bench-source", os.MFD_CLOEXEC)
    os.posix_fallocate(fd, 0, max(size, 1))
    os.ftruncate(fd, size)
    block = (bytes(range(256)) * (MIB // 256))[:MIB]
    for offset in range(0, size, MIB):
        os.pwrite(fd, block[: min(MIB, size - offset)], offset)
    return fd


def prefaulted(size: int) -> tuple[mmap.mmap, memoryview]:
    fd = os.memfd_create("bench-sink", os.MFD_CLOEXEC)
    try:
        os.posix_fallocate(fd, 0, size)
        mapped = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
    finally:
        os.close(fd)
    return mapped, memoryview(mapped)


def release(mapped: mmap.mmap, view: memoryview) -> None:
    view.release()
    mapped.close()


# --------------------------------------------------------------------------- helper roles


def tcp_server(size: int) -> None:
    """Serve ranges of a memfd over TCP with sendfile, one request per connection."""
    fd = pattern_memfd(size)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    print(listener.getsockname()[1], flush=True)

    def serve(conn: socket.socket) -> None:
        with conn:
            header = conn.recv(REQUEST.size, socket.MSG_WAITALL)
            if len(header) != REQUEST.size:
                return
            offset, length = REQUEST.unpack(header)
            end = offset + length
            while offset < end:
                offset += os.sendfile(conn.fileno(), fd, offset, end - offset)

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def flight_server(size: int) -> None:
    """A bare pyarrow.flight server: the memfd's bytes in 8 MiB batches, no copy."""
    import pyarrow as pa
    from pyarrow import flight

    fd = pattern_memfd(size)
    mapped = mmap.mmap(fd, size, access=mmap.ACCESS_READ) if size else None
    buffer = pa.py_buffer(mapped) if mapped is not None else pa.py_buffer(b"")
    schema = pa.schema([("data", pa.binary())])

    class Server(flight.FlightServerBase):  # type: ignore[misc]
        def do_get(self, context: Any, ticket: Any) -> Any:
            def batches() -> Any:
                for offset in range(0, size, CHUNK):
                    length = min(CHUNK, size - offset)
                    offsets = pa.py_buffer(b"\0\0\0\0" + length.to_bytes(4, "little"))
                    array = pa.Array.from_buffers(
                        pa.binary(), 1, [None, offsets, buffer.slice(offset, length)]
                    )
                    yield pa.RecordBatch.from_arrays([array], schema=schema)

            return flight.GeneratorStream(schema, batches())

    server = Server("grpc://127.0.0.1:0")
    print(server.port, flush=True)
    server.wait()


def spawn(role: str, size: int) -> tuple[subprocess.Popen[str], int]:
    process = subprocess.Popen(
        [sys.executable, __file__, "--role", role, "--size", str(size)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.strip().isdigit():
        process.kill()
        raise RuntimeError(f"the {role} helper did not start")
    return process, int(line)


# --------------------------------------------------------------------------- variants


def tcp_receive(port: int, view: memoryview, offset: int = 0) -> None:
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.sendall(REQUEST.pack(offset, len(view)))
        position = 0
        while position < len(view):
            count = conn.recv_into(view[position:], min(len(view) - position, 16 * MIB))
            if not count:
                raise RuntimeError("the TCP helper closed early")
            position += count


class Brokers:
    """Brokers A and B (B's peer is A), sharing a key file; optionally over mutual TLS."""

    def __init__(self, folder: str, name: str, tls: tuple[str, str, str] | None) -> None:
        key_file = os.path.join(folder, "shared.key")
        scheme = "grpc+tls" if tls else "grpc"
        tls_args: list[str] = []
        if tls is not None:
            cert, key, ca = tls
            tls_args = ["--tls-cert", cert, "--tls-key", key, "--tls-ca", ca]
        common = ["--key-file", key_file, "--memory-limit", "16GiB", "--log-level", "warning"]
        self.a: BrokerProcess = start_broker(
            os.path.join(folder, f"{name}-a.sock"),
            *common, "--flight", f"{scheme}://127.0.0.1:0", *tls_args,
        )  # fmt: skip
        assert self.a.flight_url is not None
        try:
            self.b: BrokerProcess = start_broker(
                os.path.join(folder, f"{name}-b.sock"),
                *common, "--peer", self.a.flight_url, *tls_args,
            )  # fmt: skip
        except BaseException:
            self.a.stop()
            raise
        self.at_a = connect_broker(self.a.socket_path, name="bench at A")
        self.at_b = connect_broker(self.b.socket_path, name="bench at B")

    def publish(self, key: str, size: int, *, at_b: bool = False) -> None:
        """Put a blob of *size* under *key* at A (at B with *at_b*)."""
        fd = pattern_memfd(size)
        try:
            with mmap.mmap(fd, size, access=mmap.ACCESS_READ) if size else _empty() as data:
                (self.at_b if at_b else self.at_a).put_bytes(data, key=key)
        finally:
            os.close(fd)

    def remote_get(self, key: str) -> int:
        """One timed remote get at B; the copy is dropped afterwards, untimed."""
        started = time.perf_counter_ns()
        with self.at_b.get(key) as mapped:
            elapsed = time.perf_counter_ns() - started
            assert len(mapped) >= 0
        self.at_b.delete(key)
        return elapsed

    def stop(self) -> None:
        self.at_a.close()
        self.at_b.close()
        self.b.stop()
        self.a.stop()


class _empty:
    def __enter__(self) -> bytes:
        return b""

    def __exit__(self, *exc: object) -> None:
        pass


def timed_get(client: BrokerClient, key: str) -> int:
    started = time.perf_counter_ns()
    with client.get(key):
        return time.perf_counter_ns() - started


def flight_doget(client: Any) -> int:
    from pyarrow import flight

    started = time.perf_counter_ns()
    reader = client.do_get(flight.Ticket(b"x"))
    while True:
        try:
            reader.read_chunk()
        except StopIteration:
            break
    return time.perf_counter_ns() - started


# --------------------------------------------------------------------------- measuring


@dataclass
class Run:
    results: list[Result]
    notes: list[str]


def run_tcp(port: int, size: int, *, allocating: bool) -> int:
    """One raw TCP transfer; the buffer is pre-faulted before the clock unless *allocating*."""
    if not size:
        started = time.perf_counter_ns()
        tcp_receive(port, memoryview(b""))
        return time.perf_counter_ns() - started
    if allocating:
        started = time.perf_counter_ns()
        mapped, view = prefaulted(size)
    else:
        mapped, view = prefaulted(size)
        started = time.perf_counter_ns()
    tcp_receive(port, view)
    elapsed = time.perf_counter_ns() - started
    release(mapped, view)
    return elapsed


def measure_size(
    size: int, rounds: int, plain: Brokers, tls: Brokers | None, *, seed: int, cached_runs: int
) -> list[Result]:
    from pyarrow import flight

    key = f"bench-{size}"
    plain.publish(key, size)
    if tls is not None:
        tls.publish(key, size)
    results = {name: Result("throughput", size, name) for name in (REMOTE, TCP, FLIGHT)}
    if size >= MIB:
        results[TCP_ALLOCATING] = Result("throughput", size, TCP_ALLOCATING)
    if tls is not None:
        results[REMOTE_TLS] = Result("throughput", size, REMOTE_TLS)
    tcp, tcp_port = spawn("tcp-server", size)
    bare, flight_port = spawn("flight-server", size)
    flight_client = flight.FlightClient(f"grpc://127.0.0.1:{flight_port}")
    try:
        runs: dict[str, Callable[[], int]] = {
            REMOTE: lambda: plain.remote_get(key),
            TCP: lambda: run_tcp(tcp_port, size, allocating=False),
            FLIGHT: lambda: flight_doget(flight_client),
        }
        if size >= MIB:
            runs[TCP_ALLOCATING] = lambda: run_tcp(tcp_port, size, allocating=True)
        if tls is not None:
            runs[REMOTE_TLS] = lambda: tls.remote_get(key)
        # One untimed run of each: connections made, code paths warm.
        for run in runs.values():
            run()
        order = list(runs)
        shuffler = random.Random(seed)
        for _ in range(rounds):
            shuffler.shuffle(order)
            for name in order:
                results[name].samples_ns.append(runs[name]())
        # The cached copy at B against a blob put at B: the same broker, so that which
        # CPU each broker's loop wakes on (0.08 to 0.15 ms a get here) weighs on both.
        local_key = f"{key}-local"
        plain.publish(local_key, size, at_b=True)
        with plain.at_b.get(key):
            pass
        cached, local = Result("cached", size, CACHED), Result("cached", size, LOCAL)
        for _ in range(cached_runs):
            cached.samples_ns.append(timed_get(plain.at_b, key))
            local.samples_ns.append(timed_get(plain.at_b, local_key))
        plain.at_b.delete(local_key)
        plain.at_b.delete(key)
    finally:
        flight_client.close()
        for process in (tcp, bare):
            process.kill()
            process.wait()
    plain.at_a.delete(key)
    if tls is not None:
        tls.at_a.delete(key)
    return [*results.values(), cached, local]


def measure_parallel(size: int, rounds: int, plain: Brokers, seed: int) -> list[Result]:
    keys = [f"bench-parallel-{index}" for index in range(STREAMS)]
    for key in keys:
        plain.publish(key, size)
    total = size * STREAMS
    parallel = Result("parallel", total, PARALLEL)
    tcp_parallel = Result("parallel", total, TCP_PARALLEL)
    tcp_allocating = Result("parallel", total, TCP_PARALLEL_ALLOCATING)
    tcp, port = spawn("tcp-server", size)
    clients = [connect_broker(plain.b.socket_path, name=f"bench {i}") for i in range(STREAMS)]
    try:

        def run_remote() -> int:
            def one(index: int) -> None:
                with clients[index].get(keys[index]):
                    pass

            elapsed = _in_threads(one)
            for key in keys:
                plain.at_b.delete(key)
            return elapsed

        def run_tcp() -> int:
            buffers = [prefaulted(size) for _ in range(STREAMS)]
            elapsed = _in_threads(lambda index: tcp_receive(port, buffers[index][1]))
            for mapped, view in buffers:
                release(mapped, view)
            return elapsed

        def run_tcp_allocating() -> int:
            # As B must for its copies: each buffer allocated and faulted in on the clock.
            buffers: list[tuple[mmap.mmap, memoryview]] = []

            def one(index: int) -> None:
                buffer = prefaulted(size)
                buffers.append(buffer)
                tcp_receive(port, buffer[1])

            elapsed = _in_threads(one)
            for mapped, view in buffers:
                release(mapped, view)
            return elapsed

        runs = {
            PARALLEL: run_remote,
            TCP_PARALLEL: run_tcp,
            TCP_PARALLEL_ALLOCATING: run_tcp_allocating,
        }
        for run in runs.values():
            run()
        order = list(runs)
        shuffler = random.Random(seed)
        results = {
            PARALLEL: parallel,
            TCP_PARALLEL: tcp_parallel,
            TCP_PARALLEL_ALLOCATING: tcp_allocating,
        }
        for _ in range(rounds):
            shuffler.shuffle(order)
            for name in order:
                results[name].samples_ns.append(runs[name]())
    finally:
        for client in clients:
            client.close()
        tcp.kill()
        tcp.wait()
    for key in keys:
        plain.at_a.delete(key)
    return [parallel, tcp_parallel, tcp_allocating]


def _in_threads(work: Callable[[int], None]) -> int:
    errors: list[BaseException] = []

    def guarded(index: int) -> None:
        try:
            work(index)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(STREAMS)]
    started = time.perf_counter_ns()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter_ns() - started
    if errors:
        raise errors[0]
    return elapsed


def make_certificates(folder: str) -> tuple[str, str, str] | None:
    """A CA and a certificate for 127.0.0.1 it signed, for both brokers; None without openssl."""
    if shutil.which("openssl") is None:
        return None
    ca, ca_key = os.path.join(folder, "ca.pem"), os.path.join(folder, "ca.key")
    cert, key = os.path.join(folder, "cert.pem"), os.path.join(folder, "cert.key")
    csr, ext = os.path.join(folder, "cert.csr"), os.path.join(folder, "cert.ext")
    with open(ext, "w") as out:
        out.write("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n")
    for args in (
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=bench ca",
         "-keyout", ca_key, "-out", ca],
        ["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=bench", "-keyout", key,
         "-out", csr],
        ["x509", "-req", "-in", csr, "-days", "1", "-CA", ca, "-CAkey", ca_key,
         "-CAcreateserial", "-extfile", ext, "-out", cert],
    ):  # fmt: skip
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)
    return cert, key, ca


# --------------------------------------------------------------------------- report


def find(results: list[Result], variant: str, size: int) -> Result | None:
    return next((r for r in results if r.variant == variant and r.size == size), None)


@dataclass
class Verdict:
    what: str
    target: str
    value: float | None
    met: bool | None
    detail: str

    def line(self) -> str:
        if self.met is None:
            return f"{self.what}: {self.detail}  target {self.target}: not judged"
        verdict = "met" if self.met else "NOT met"
        return f"{self.what}: {self.detail}  target {self.target} {verdict}"


def verdicts(results: list[Result], target_size: int) -> list[Verdict]:
    out: list[Verdict] = []

    def ratio(what: str, ours: Result | None, base: Result | None, target: float) -> None:
        if ours is None or base is None:
            out.append(Verdict(what, f">= {target:.0%}", None, None, "not measured"))
            return
        value = base.median_ns / ours.median_ns
        detail = f"{value:.0%} ({ours.gbps:.2f} / {base.gbps:.2f} GB/s)"
        out.append(Verdict(what, f">= {target:.0%}", value, value >= target, detail))

    tcp = find(results, TCP, target_size)
    ratio(
        f"{fmt_size(target_size)} remote get / raw TCP",
        find(results, REMOTE, target_size),
        tcp,
        REMOTE_TARGET,
    )
    parallel = [r for r in results if r.variant == PARALLEL]
    ratio(
        "4 parallel remote gets / 4-stream TCP",
        parallel[0] if parallel else None,
        next((r for r in results if r.variant == TCP_PARALLEL), None),
        PARALLEL_TARGET,
    )
    ratio(
        f"{fmt_size(target_size)} remote get over mutual TLS / raw TCP",
        find(results, REMOTE_TLS, target_size),
        tcp,
        TLS_TARGET,
    )
    small = find(results, REMOTE, SMALL)
    if small is not None:
        met = small.median_ns <= SMALL_TARGET_NS
        detail = f"p50 {fmt_time(small.median_ns)}, p99 {fmt_time(small.p99_ns)}"
        out.append(Verdict("4 KiB remote get", "<= 1 ms p50", small.median_ns, met, detail))
    for size in sorted({r.size for r in results if r.variant == CACHED}):
        cached, local = find(results, CACHED, size), find(results, LOCAL, size)
        assert cached is not None
        assert local is not None
        value = cached.median_ns / local.median_ns
        detail = f"{value:.2f}x ({fmt_time(cached.median_ns)} / {fmt_time(local.median_ns)})"
        what = f"{fmt_size(size)} cached get at B / local get at B"
        out.append(Verdict(what, f"<= {CACHED_TARGET:g}x", value, value <= CACHED_TARGET, detail))
    return out


def table(results: list[Result], title: str) -> Table:
    out = Table(title=title)
    for name in ("size", "variant", "runs", "p50", "p99", "GB/s", "vs raw TCP"):
        out.add_column(name, justify="left" if name == "variant" else "right")
    sizes = sorted({r.size for r in results})
    for size in sizes:
        group = [r for r in results if r.size == size]
        base = next(
            (r for r in group if r.variant in (TCP, TCP_PARALLEL)),
            None,
        )
        for index, r in enumerate(group):
            versus = "" if base is None or r is base else f"{base.median_ns / r.median_ns:.0%}"
            out.add_row(
                fmt_size(size) if index == 0 else "",
                r.variant,
                str(len(r.samples_ns)),
                fmt_time(r.median_ns),
                fmt_time(r.p99_ns),
                f"{r.gbps:.2f}" if size >= MIB else "",
                versus,
                end_section=index == len(group) - 1,
            )
    return out


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small sizes and few runs")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    parser.add_argument("--no-tls", action="store_true", help="leave the TLS rows out")
    parser.add_argument("--role", choices=["tcp-server", "flight-server"], help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role == "tcp-server":
        tcp_server(args.size)
        return 0
    if args.role == "flight-server":
        flight_server(args.size)
        return 0
    console = Console(width=None if sys.stdout.isatty() else 150)
    plan = QUICK_PLAN if args.quick else DEFAULT_PLAN
    parallel_size = QUICK_PARALLEL_SIZE if args.quick else PARALLEL_SIZE
    parallel_rounds = QUICK_PARALLEL_ROUNDS if args.quick else PARALLEL_ROUNDS
    cached_runs = QUICK_CACHED_RUNS if args.quick else CACHED_RUNS
    target_size = max(plan)
    notes: list[str] = []
    started = time.perf_counter()
    folder = tempfile.mkdtemp(prefix="bp-fed-")
    os.chmod(folder, 0o700)
    results: list[Result] = []
    try:
        certs = None if args.no_tls else make_certificates(folder)
        if certs is None:
            notes.append("the TLS rows are left out (--no-tls, or no openssl command)")
        plain = Brokers(folder, "plain", None)
        secure = None
        try:
            secure = Brokers(folder, "tls", certs) if certs is not None else None
            for index, (size, rounds) in enumerate(plan.items()):
                console.print(f"[dim]{fmt_size(size)}: {rounds} runs of each variant…[/dim]")
                results += measure_size(
                    size, rounds, plain, secure, seed=index, cached_runs=cached_runs
                )
            console.print(
                f"[dim]{STREAMS} parallel keys of {fmt_size(parallel_size)}: "
                f"{parallel_rounds} runs…[/dim]"
            )
            results += measure_parallel(parallel_size, parallel_rounds, plain, seed=99)
        finally:
            if secure is not None:
                secure.stop()
            plain.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    env = environment()
    console.print(
        f"{env['time']}  {env.get('cpu', '?')}, {env['cpus']} CPUs"
        f"{' (virtual machine)' if env.get('virtual_machine') else ''}, "
        f"Linux {env['kernel']}, Python {env['python']}"
    )
    transfers = [r for r in results if r.phase == "throughput"]
    console.print(table(transfers, "a key that lives at A, got by a client of B"))
    console.print(table([r for r in results if r.phase == "cached"], "a second get: the copy"))
    console.print(table([r for r in results if r.phase == "parallel"], "4 keys at once"))
    for note in notes:
        console.print(f"[yellow]note[/yellow]: {note}")
    judged = verdicts(results, target_size)
    for verdict in judged:
        console.print(verdict.line())
    seconds = time.perf_counter() - started
    console.print(f"[dim]{seconds:.0f} s[/dim]")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(
                {
                    "environment": env,
                    "wall_seconds": round(seconds, 1),
                    "notes": notes,
                    "results": [r.to_json() for r in results],
                    "verdicts": [
                        {"what": v.what, "target": v.target, "value": v.value, "met": v.met}
                        for v in judged
                    ],
                },
                out,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
