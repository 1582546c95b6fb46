"""A fork server for workflow jobs: start-up is a fork, not a fresh interpreter.

Every workflow script starts with ``delegate(snakemake)``. When the worker is enabled,
the job process (the *client*) hands its script to a server that runs in the run
directory with torch, transformers, lm-eval and the package already imported; the
server forks a child that re-runs the script file with the client's stdin/stdout/stderr,
working directory and environment, and the client exits with the child's status. The
heavy imports happen once per server instead of once per job.

- The first job starts the server (daemonised, under a lock so that concurrent first
  jobs start one). It listens on ``.snakemake/mergescale-worker/<key>.sock`` in the run
  directory; ``<key>`` hashes the interpreter, the package and the environment (thread
  counts included), so jobs only ever run in a server whose imports saw their exact
  environment. It exits after ``MERGESCALE_WORKER_IDLE_S`` seconds (default 120) without
  a job, when its socket file is removed, or when a source file of the package changes
  (the job that notices starts a fresh server).
- A killed client takes its job with it: the client forwards SIGTERM/SIGINT/SIGHUP to
  the child's process group, and the server kills the group when the client's
  connection closes (SIGKILL of the client).
- Off under SLURM (``SLURM_JOB_ID`` set), with ``MERGESCALE_WORKER=0`` or the config key
  ``worker: false``; if the server cannot be reached or started the job runs in its own
  process, as without the worker, after a one-line note on stderr.

Only the standard library is imported here at module level: the client must stay light.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ENV_SWITCH = "MERGESCALE_WORKER"          # "0"/"false"/"off": every job in its own process
ENV_IDLE = "MERGESCALE_WORKER_IDLE_S"     # seconds a server waits for the next job
ENV_PRELOAD = "MERGESCALE_WORKER_PRELOAD"  # comma-separated modules instead of PRELOAD
DEFAULT_IDLE_S = 120.0
START_TIMEOUT_S = 30.0                    # for a new server to listen
ACCEPT_TIMEOUT_S = 600.0                  # for a server to take the job (its imports first)
WORKER_DIR = Path(".snakemake") / "mergescale-worker"  # under the run directory

# Imported by the server before it forks: what the workflow's scripts import (Snakemake's
# script preamble first). A module missing here is imported by the job itself (slower,
# not wrong); tests/test_worker.py checks the scripts' imports against this list.
PRELOAD = (
    "snakemake.io", "snakemake.iocontainers", "snakemake.logging",
    "numpy", "pandas", "scipy.stats", "scipy.optimize", "torch", "safetensors.torch",
    "transformers", "transformers.models.llama.modeling_llama", "lm_eval",
    "lm_eval.evaluator", "lm_eval.tasks", "lm_eval.models.huggingface", "matplotlib.pyplot",
    "mergescale.report.aggregate", "mergescale.rule_methods.atlas", "mergescale.studies.cross_seed.barrier",
    "mergescale.studies.cross_seed.merge", "mergescale.studies.cross_seed.plan", "mergescale.evaluate.ensemble",
    "mergescale.evaluate.ensemble_lm", "mergescale.evaluate.harness", "mergescale.report.findings", "mergescale.sources.hub",
    "mergescale.sources.gguf", "mergescale.io_utils", "mergescale.job",
    "mergescale.tasks.lmeval_data", "mergescale.rule_methods.lora_lego", "mergescale.rule_methods.map_pareto",
    "mergescale.merge", "mergescale.merge.data_aware", "mergescale.rule_methods.opcm", "mergescale.report.plots",
    "mergescale.rule_methods.registry", "mergescale.studies.sparse_soups.cycle", "mergescale.studies.sparse_soups.report",
    "mergescale.evaluate.spec_models", "mergescale.training.stages", "mergescale.merge.statistics", "mergescale.tasks",
    "mergescale.tasks.lmeval_yaml", "mergescale.merge.task_vectors", "mergescale.evaluate.tuning",
    "mergescale.merge.search_space", "mergescale.sources.grid",
    "mergescale.rule_methods.twin_merging", "mergescale.report.results_page", "mergescale.report.inference",
)

# Environment variables that differ between the jobs of one run without changing imports.
_VOLATILE_ENV = frozenset({"_", "PWD", "OLDPWD", "SHLVL"})
_OFF = {"0", "false", "no", "off"}

# In a job the server forked: that job's request (``delegate`` then returns at once).
job_request: dict | None = None


class WorkerUnavailable(Exception):
    """The job could not be handed to a worker; it runs in its own process instead."""


# --- the client ---------------------------------------------------------------------


def enabled(config: dict | None = None) -> bool:
    """Whether jobs go to the worker: not under SLURM, not switched off, fork available."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in _OFF or "SLURM_JOB_ID" in os.environ:
        return False
    if config is not None and config.get("worker", True) is False:
        return False
    return hasattr(os, "fork") and hasattr(socket, "send_fds")


def delegate(snakemake) -> None:
    """Run this workflow script in the run's worker and exit with its status; return
    (to run the script here) when the worker is off, or this already is the worker's
    child, or no worker could be reached."""
    if job_request is not None or not enabled(getattr(snakemake, "config", None)):
        return
    script = os.path.abspath(sys.argv[0])  # the file Snakemake generated for this job
    try:
        status = run_in_worker(script)
    except WorkerUnavailable as exc:
        print(f"mergescale worker: {exc}; running the job in its own process", file=sys.stderr,
              flush=True)
        return
    exit_with(status)


def exit_with(status: int) -> None:
    """Leave the process as the worker's child left: with its exit code or its signal."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if status < 0:
        try:
            signal.signal(-status, signal.SIG_DFL)
        except (OSError, ValueError):  # SIGKILL, SIGSTOP: their action is fixed
            pass
        os.kill(os.getpid(), -status)
        time.sleep(1)  # the signal is delivered; never reached for deadly ones
        status = 128 - status
    os._exit(status)


def worker_key(env: dict[str, str] | None = None) -> str:
    """Which server a job may use: same interpreter, package and environment."""
    import hashlib

    env = os.environ if env is None else env
    items = sorted((k, v) for k, v in env.items() if k not in _VOLATILE_ENV)
    blob = json.dumps([sys.executable, sys.version, str(Path(__file__).resolve().parent), items])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_in_worker(script: str, fds: tuple[int, int, int] = (0, 1, 2)) -> int:
    """Run ``script`` in the worker of the current directory; the child's exit status
    (negative: killed by that signal). Raises WorkerUnavailable if it never started."""
    key = worker_key()
    request = {"kind": "job", "script": script, "cwd": os.getcwd(), "env": dict(os.environ),
               "argv": list(sys.argv), "sys_path": list(sys.path), "client_pid": os.getpid()}
    reason = "no reply"
    for _ in range(3):  # a server may be exiting (idle, stale code) as we connect
        try:
            sock = connect(key) or start_server(key)
        except OSError as exc:  # e.g. no writable .snakemake/ here
            raise WorkerUnavailable(f"{type(exc).__name__}: {exc}") from None
        with sock:
            try:
                sock.settimeout(ACCEPT_TIMEOUT_S)
                send_msg(sock, request)
                with _stdio_fds(fds) as job_fds:
                    socket.send_fds(sock, [b"F"], list(job_fds))
                reply = recv_msg(sock)
                sock.settimeout(None)
            except TimeoutError:  # the server forks no job whose client has gone
                raise WorkerUnavailable(f"no answer in {ACCEPT_TIMEOUT_S:.0f} s") from None
            except OSError as exc:
                reason = f"{type(exc).__name__}: {exc}"
                continue
            if reply is None or "pid" not in reply:
                reason = "the worker stopped" if reply is None else json.dumps(reply)
                continue
            return _wait_for_child(sock, reply["pid"])
    raise WorkerUnavailable(reason)


def _wait_for_child(sock: socket.socket, pid: int) -> int:
    """The child's status; signals the client gets go to the child's process group."""
    def forward(signum, _frame):
        try:
            os.killpg(pid, signum)
        except OSError:
            pass

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    reply = recv_msg(sock)  # retried after each forwarded signal (PEP 475)
    if reply is None:  # the server died under the job: do not leave the child behind
        forward(signal.SIGKILL, None)
        print("mergescale worker: the worker stopped while running this job", file=sys.stderr)
        return 1
    return int(reply["status"])


@contextmanager
def _stdio_fds(fds):
    """The job's stdin/stdout/stderr to send; /dev/null for any that is closed."""
    opened = []
    out = []
    for fd in fds:
        try:
            os.fstat(fd)
            out.append(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            opened.append(null)
            out.append(null)
    try:
        yield out
    finally:
        for fd in opened:
            os.close(fd)


def _socket_path(key: str) -> Path:
    # Relative to the run directory (every job's cwd): AF_UNIX paths are limited to ~100
    # bytes, run directories are not.
    return WORKER_DIR / f"{key}.sock"


def connect(key: str) -> socket.socket | None:
    """A connection to the running server of ``key`` in the current directory, or None."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(_socket_path(key)))
        return sock
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        return None


def start_server(key: str) -> socket.socket:
    """Start the server of ``key`` unless another job just did; a connection to it."""
    import fcntl

    WORKER_DIR.mkdir(parents=True, exist_ok=True)
    os.chmod(WORKER_DIR, 0o700)  # only this user's jobs reach the socket
    with open(WORKER_DIR / f"{key}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        sock = connect(key)
        if sock is not None:
            return sock
        _socket_path(key).unlink(missing_ok=True)  # left by a server that died
        pid = _spawn_daemon(key)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            sock = connect(key)
            if sock is not None:
                return sock
            if not _alive(pid):
                break
            time.sleep(0.02)
    log = WORKER_DIR / f"{key}.log"
    tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
    raise WorkerUnavailable(f"the worker did not start ({log}{': ' + tail[0] if tail else ''})")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


_SERVE = "import sys; del sys.path[0]; from mergescale.worker import serve; serve(sys.argv[1])"


def _spawn_daemon(key: str) -> int:
    """Start ``serve(key)`` detached (double fork, own session, stdio to its log) so that
    it is no job's child: Snakemake's benchmark of the first job must not count it."""
    log = WORKER_DIR / f"{key}.log"
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            os.setsid()
            daemon = os.fork()
            if daemon == 0:
                null = os.open(os.devnull, os.O_RDONLY)
                out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                os.dup2(null, 0)
                os.dup2(out, 1)
                os.dup2(out, 2)
                os.closerange(3, 65536)
                os.execv(sys.executable, [sys.executable, "-c", _SERVE, key])
            os.write(w, str(daemon).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    os.waitpid(pid, 0)
    daemon = os.read(r, 32)
    os.close(r)
    if not daemon:
        raise WorkerUnavailable("could not fork the worker")
    return int(daemon)


def send_msg(sock: socket.socket, obj: dict) -> None:
    data = json.dumps(obj).encode()
    sock.sendall(struct.pack(">I", len(data)) + data)


def recv_msg(sock: socket.socket) -> dict | None:
    """One length-prefixed JSON message, or None at end of stream."""
    head = _recv_exactly(sock, 4)
    if head is None:
        return None
    body = _recv_exactly(sock, struct.unpack(">I", head)[0])
    return None if body is None else json.loads(body)


def _recv_exactly(sock: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        try:
            chunk = sock.recv(n - len(buf))
        except ConnectionResetError:
            return None
        if not chunk:
            return None
        buf += chunk
    return buf


def stop(run_dir: str | Path = ".") -> int:
    """Ask every worker of ``run_dir`` to stop (after its running jobs); how many answered."""
    answered = 0
    with _cwd(run_dir):
        for path in sorted(WORKER_DIR.glob("*.sock")):
            sock = connect(path.stem)
            if sock is None:
                continue
            with sock:
                send_msg(sock, {"kind": "stop"})
                answered += recv_msg(sock) is not None
    return answered


def ping(key: str, run_dir: str | Path = ".") -> dict | None:
    """The server's pid and running jobs, or None when none listens."""
    with _cwd(run_dir):
        sock = connect(key)
    if sock is None:
        return None
    with sock:
        send_msg(sock, {"kind": "ping"})
        return recv_msg(sock)


@contextmanager
def _cwd(path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


# --- the server ---------------------------------------------------------------------


def serve(key: str) -> None:
    """Listen in the current directory (the run directory) until idle; fork a child per job."""
    import selectors

    idle_s = float(os.environ.get(ENV_IDLE, DEFAULT_IDLE_S))
    path = _socket_path(key)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))  # first, so that jobs queue while the imports run
    listener.listen(128)
    inode = os.stat(path).st_ino
    print(f"[{time.strftime('%H:%M:%S')}] worker {os.getpid()} listening on {path}", flush=True)
    _preload()
    sources = _source_stamps()

    wake_r, wake_w = socket.socketpair()
    for s in (wake_r, wake_w):
        s.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno())
    state = {"stopping": False}
    signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes the loop through wake_w
    signal.signal(signal.SIGTERM, lambda *_: state.update(stopping=True))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, "accept")
    sel.register(wake_r, selectors.EVENT_READ, "wake")
    jobs: dict[int, socket.socket | None] = {}   # child pid -> its client's connection
    last_job = time.monotonic()

    def stop_listening():
        nonlocal listener
        if listener is None:
            return
        sel.unregister(listener)
        listener.close()
        listener = None
        if _same_inode(path, inode):
            path.unlink(missing_ok=True)

    def drop(conn):
        sel.unregister(conn)
        conn.close()

    def reap():
        nonlocal last_job
        while jobs:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = jobs.pop(pid, None)
            last_job = time.monotonic()
            if conn is not None:
                try:
                    send_msg(conn, {"status": os.waitstatus_to_exitcode(status)})
                except OSError:
                    pass
                drop(conn)

    while listener is not None or jobs:
        for sel_key, _ in sel.select(timeout=1.0):
            if sel_key.data == "accept":
                if listener is None:  # closed by an earlier event of this round
                    continue
                try:
                    conn, _ = listener.accept()
                except OSError:
                    continue
                if _serve_request(conn, state, sources, jobs, sel,
                                  [listener, wake_r, wake_w], stop_listening):
                    last_job = time.monotonic()
            elif sel_key.data == "wake":
                try:
                    wake_r.recv(4096)
                except BlockingIOError:
                    pass
            else:  # a client's connection: the client is gone (or broke the protocol)
                conn, pid = sel_key.fileobj, sel_key.data
                try:
                    gone = conn.recv(4096) == b""
                except OSError:
                    gone = True
                if gone:
                    _kill_group(pid, signal.SIGKILL)
                    jobs[pid] = None
                    drop(conn)
        reap()
        idle = not jobs and time.monotonic() - last_job > idle_s
        if listener is not None and (state["stopping"] or idle or not _same_inode(path, inode)):
            stop_listening()
    print(f"[{time.strftime('%H:%M:%S')}] worker {os.getpid()} stopped after "
          f"{time.process_time():.1f} CPU s of its own", flush=True)


def _serve_request(conn, state, sources, jobs, sel, server_socks, stop_listening) -> bool:
    """Read one request; fork its job. True when a job started."""
    import selectors

    conn.settimeout(10)
    fds: list[int] = []
    try:
        if hasattr(socket, "SO_PEERCRED"):
            _, uid, _ = struct.unpack("3i", conn.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
            if uid != os.getuid():
                raise PermissionError(f"a job of uid {uid}")
        request = recv_msg(conn)
        if request is None:
            raise ConnectionError("no request")
        if request["kind"] == "ping":
            send_msg(conn, {"pid": os.getpid(), "jobs": len(jobs)})
            conn.close()
            return False
        if request["kind"] == "stop":
            state["stopping"] = True
            stop_listening()
            send_msg(conn, {"stopping": True})
            conn.close()
            return False
        _, fds, _, _ = socket.recv_fds(conn, 1, 3)
        if len(fds) != 3:
            raise ConnectionError(f"{len(fds)} file descriptors instead of 3")
        if state["stopping"] or _changed(sources):
            # stale imports: this server takes no more jobs; the client starts a fresh one
            state["stopping"] = True
            stop_listening()  # before the reply: the client's next connect must not reach us
            send_msg(conn, {"stale": True})
            conn.close()
            return False
        if _client_gone(conn):  # it gave up waiting (or was killed) while we imported
            conn.close()
            return False
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        pid = os.fork()
        if pid == 0:
            _run_child(request, fds, [conn, *server_socks, sel,
                                      *(c for c in jobs.values() if c is not None)])
        try:
            os.setpgid(pid, pid)  # also done by the child: whichever runs first
        except OSError:
            pass
        jobs[pid] = conn
        try:
            send_msg(conn, {"pid": pid})
        except OSError:
            _kill_group(pid, signal.SIGKILL)
            jobs[pid] = None
            conn.close()
            return True
        conn.setblocking(False)
        sel.register(conn, selectors.EVENT_READ, pid)
        return True
    except (OSError, ValueError, KeyError) as exc:
        print(f"worker: request refused: {type(exc).__name__}: {exc}", flush=True)
        conn.close()
        return False
    finally:
        for fd in fds:
            os.close(fd)


def _client_gone(conn: socket.socket) -> bool:
    conn.setblocking(False)
    try:
        return conn.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        conn.settimeout(10)


def _kill_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except OSError:
        pass


def _same_inode(path: Path, inode: int) -> bool:
    try:
        return os.stat(path).st_ino == inode
    except OSError:
        return False


def _preload() -> None:
    import importlib

    start = time.monotonic()
    names = os.environ.get(ENV_PRELOAD)
    for name in PRELOAD if names is None else [n.strip() for n in names.split(",") if n.strip()]:
        try:
            importlib.import_module(name)
        except Exception as exc:  # an optional dependency: the job imports (or fails) itself
            print(f"worker: not preloaded: {name} ({type(exc).__name__}: {exc})", flush=True)
    import threading

    print(f"[{time.strftime('%H:%M:%S')}] worker {os.getpid()} imported {len(sys.modules)} "
          f"modules in {time.monotonic() - start:.1f} s ({time.process_time():.1f} CPU s); "
          f"{threading.active_count()} Python thread(s)", flush=True)


def _source_stamps() -> dict[str, tuple[int, int]]:
    """mtime and size of every loaded source file of the package: a change means stale imports."""
    root = str(Path(__file__).resolve().parent)
    stamps = {}
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if path and os.path.realpath(path).startswith(root):
            try:
                st = os.stat(path)
                stamps[path] = (st.st_mtime_ns, st.st_size)
            except OSError:
                pass
    return stamps


def _changed(stamps: dict[str, tuple[int, int]]) -> bool:
    for path, stamp in stamps.items():
        try:
            st = os.stat(path)
        except OSError:
            return True
        if (st.st_mtime_ns, st.st_size) != stamp:
            return True
    return False


# --- the forked child ---------------------------------------------------------------


def _run_child(request: dict, fds: list[int], close: list[socket.socket]) -> None:
    """Become the job: its stdio, cwd, environment and argv; run its script; exit."""
    global job_request
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.setpgid(0, 0)  # the job and whatever it starts die together
        for sock in close:
            sock.close()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        for fd in fds:
            os.close(fd)
        sys.stdout.reconfigure(line_buffering=os.isatty(1))
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv[:] = request["argv"]
        sys.path[:] = request["sys_path"]
        _fresh_random_state()
        job_request = request
        code = _run_script(request["script"])
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


def _fresh_random_state() -> None:
    """Seed the global generators from the OS, as a new interpreter does, rather than
    share the server's state with every other job (Python's, NumPy's and torch's CPU
    generator; torch seeds from the OS in a new process too). Seeded code is unaffected."""
    import random

    random.seed()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    if "torch" in sys.modules:
        sys.modules["torch"].default_generator.seed()


def _run_script(script: str) -> int:
    """Run the script file as ``python script`` would; its exit status."""
    import runpy
    import traceback

    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        if exc.code is None:
            code = 0
        elif isinstance(exc.code, int):
            code = exc.code
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException as exc:
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != script:
            tb = tb.tb_next  # drop this module's and runpy's frames
        traceback.print_exception(type(exc), exc, tb or exc.__traceback__)
        code = -signal.SIGINT if isinstance(exc, KeyboardInterrupt) else 1
    _interpreter_exit()
    if code == -signal.SIGINT:
        sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    return code


def _interpreter_exit() -> None:
    """What the interpreter does at exit: join non-daemon threads, run atexit handlers."""
    import atexit
    import threading

    try:
        threading._shutdown()  # noqa: SLF001 - the interpreter's own exit step
    except Exception:
        pass
    atexit._run_exitfuncs()  # noqa: SLF001


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m mergescale.worker",
                                description="Stop the job workers of a run directory.")
    p.add_argument("command", choices=["stop"])
    p.add_argument("run_dir", nargs="?", default=".")
    args = p.parse_args(argv)
    print(f"{stop(args.run_dir)} worker(s) stopping")


if __name__ == "__main__":
    main()
