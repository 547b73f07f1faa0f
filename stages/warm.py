"""Warm start for the model stages: a per-user server keeps torch, transformers and the tokenizer
loaded and forks a ready process for each stage.

Why: every DVC stage is a fresh Python process, and a model stage spends 7-10 s on a CPU importing
torch, transformers and the model's modelling code and unpickling the tokenizer before it computes
anything; a `dvc exp run` reruns about ten of them. Here `python -m stages.<model stage>` asks the
server for a process that has already done that (forked: copy-on-write, nothing shared afterwards),
hands it its cwd, environment, arguments and standard streams, forwards signals to it and exits with
its status. The stage itself runs exactly as it would cold: the project's own code (`matrice`,
`stages`) is never loaded in the server, so each stage imports it fresh from its working tree.

- The server is started by the first model stage that finds none (that stage runs cold), learns from
  each stage which third-party modules and which cached tokenizers it used, and exits after
  `MATRICE_WARM_IDLE` seconds (default 60) without work. A stage that loads no model through it
  (attribution, which runs minutes to hours between the probe and the experiments) holds a running
  server while it runs, so the experiment after it starts warm.
- One server per interpreter, environment, priority, installed packages and version of this file
  (all in the socket's name): a stage never reuses a process whose imports saw other settings.
- CPU builds of torch only (a forked process cannot use a CUDA context its parent created, and GPU
  runs do not notice the start-up); `MATRICE_WARM=0` turns it off; any failure to reach the server
  runs the stage cold.
"""

from __future__ import annotations

import atexit
import hashlib
import importlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ENABLE_ENV = "MATRICE_WARM"
IDLE_ENV = "MATRICE_WARM_IDLE"
DIR_ENV = "MATRICE_WARM_DIR"
REGISTRY = "_matrice_warm"  # the server module's name in sys.modules: a forked stage finds preloaded tokenizers there
MODEL_STAGES = frozenset({
    "probe", "manipulate", "controls", "edit", "edit_sweep", "enhance", "inject", "case_study",
    "degenerate", "fact_check", "consistency",
})
PRELOADED_PACKAGES = frozenset({
    "torch", "transformers", "tokenizers", "safetensors", "numpy", "scipy", "sklearn", "peft",
    "accelerate", "huggingface_hub", "yaml", "tqdm", "matplotlib",
})
CHILD_ENV = "_MATRICE_WARM_CHILD"  # set in a forked stage: its own `stages` import must not hand off again
VOLATILE_ENV = frozenset({"PWD", "OLDPWD", "SHLVL", "_", "TERM", "COLUMNS", "LINES", CHILD_ENV})
PROJECT_PACKAGES = ("matrice", "stages")
MAX_SOCKET_PATH = 100  # bytes: sockaddr_un holds 108 on Linux, 104 on macOS, with the terminating NUL
# The server loads this file by path under REGISTRY, with no project directory on sys.path (run as a
# script, `stages/` would be on it and shadow the standard library's `select`).
SERVER_MAIN = f"""
import importlib.util, os, sys
sys.path[:] = [p for p in sys.path if p not in ("", os.getcwd())]
spec = importlib.util.spec_from_file_location({REGISTRY!r}, sys.argv[1])
server = importlib.util.module_from_spec(spec)
sys.modules[{REGISTRY!r}] = server
spec.loader.exec_module(server)
server.serve(server.Path(sys.argv[2]), float(os.environ.get({IDLE_ENV!r}, "60")), int(sys.argv[3]))
"""

TOKENIZERS: dict[str, Any] = {}  # pickle path -> tokenizer, in the server (see matrice.models.tokenizer_cache)
SERVER_PATH: Path | None = None  # the socket this process serves (or was forked from)
_LOCK: Any = None  # the server's lock file, held while it serves (a forked stage closes its copy)


# ---- framing -----------------------------------------------------------------------------------

def _send(sock: socket.socket, message: dict[str, Any]) -> None:
    data = json.dumps(message).encode()
    sock.sendall(struct.pack("!I", len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(n - got)
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _recv(sock: socket.socket) -> dict[str, Any] | None:
    head = _recv_exact(sock, 4)
    if head is None:
        return None
    body = _recv_exact(sock, struct.unpack("!I", head)[0])
    return None if body is None else json.loads(body)


# ---- where the server lives --------------------------------------------------------------------

def enabled() -> bool:
    return os.environ.get(ENABLE_ENV, "1") not in {"0", "false", "no", "off"}


def server_key() -> str:
    """What a process's imports may depend on: interpreter, environment, priority, installed packages
    (the site-packages directories' modification times) and this file."""
    env = {k: v for k, v in os.environ.items() if k not in VOLATILE_ENV and not k.startswith("DVC_")}
    sites = [p for p in sys.path if p.endswith("site-packages") and os.path.isdir(p)]
    parts = {
        "exe": os.path.realpath(sys.executable), "version": sys.version, "flags": repr(sys.flags),
        "env": sorted(env.items()), "priority": os.getpriority(os.PRIO_PROCESS, 0),
        "sites": [(p, os.stat(p).st_mtime_ns) for p in sites],
        "source": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def socket_dir() -> Path:
    root = os.environ.get(DIR_ENV) or os.path.join(os.environ.get("XDG_RUNTIME_DIR") or "/tmp", f"matrice-warm-{os.getuid()}")
    path = Path(root)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def socket_path() -> Path:
    return socket_dir() / f"{server_key()}.sock"


# ---- the stage's side ----------------------------------------------------------------------------

def stage_module() -> str | None:
    """`stages.<name>` when this process is the interpreter's own `python -m stages.<name> ...` and
    is locating that module (sys.argv[0] is then "-m"), not a script that runs one with runpy."""
    argv = getattr(sys, "orig_argv", [])
    if sys.argv[:1] != ["-m"] or "-m" not in argv:
        return None
    index = argv.index("-m")
    return argv[index + 1] if index + 1 < len(argv) else None


def hand_off(module: str, argv: list[str], path: Path | None = None) -> int | None:
    """Run ``python -m module argv...`` in a warm process; its exit status, or None when no server
    answered (one is started for the next stage; the caller runs cold)."""
    path = path or socket_path()
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        return None  # a Unix socket's path cannot be this long: run cold rather than start servers that cannot bind
    if path.with_suffix(".off").exists():
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
        socket.send_fds(sock, [b"R"], [0, 1, 2])
        _send(sock, {"module": module, "argv": argv, "cwd": os.getcwd(), "env": dict(os.environ),
                     "umask": _umask(), "orig_argv": list(getattr(sys, "orig_argv", []))})
        started = _recv(sock)
    except OSError:
        sock.close()
        start_server(path)
        return None
    if not started or "pid" not in started:
        sock.close()
        return None
    return _wait_for(sock, started["pid"])


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _wait_for(sock: socket.socket, pid: int) -> int:
    """The forked stage's exit status; signals this process receives go to it."""
    def forward(signum: int, _frame: Any) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, forward)
    try:
        done = _recv(sock)  # a forwarded signal does not interrupt it: recv retries after the handler (PEP 475)
    finally:
        sock.close()
    if done is None:
        print(f"matrice warm start: the stage process {pid} ended without an exit status (killed?)", file=sys.stderr)
        return 1
    return int(done["exit"])


def start_server(path: Path) -> None:
    """Start a detached server for ``path`` (it exits at once when another one holds it). It does not
    count itself idle while this process (the cold stage that started it) runs."""
    try:
        subprocess.Popen([sys.executable, "-c", SERVER_MAIN, os.path.abspath(__file__), str(path), str(os.getpid())], cwd="/",
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    except OSError:
        pass


def _notify(path: Path, kind: bytes, message: dict[str, Any] | None = None) -> bool:
    """Send the server at ``path`` a request that needs no answer (learn, hold, stop); whether it was reached."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
        socket.send_fds(sock, [kind], [])
        if message is not None:
            _send(sock, message)
        return True
    except OSError:
        return False
    finally:
        sock.close()


def teach(path: Path | None = None) -> None:
    """Tell the server which third-party modules and cached tokenizers this process used, so the
    next stage's process has them already."""
    modules = [m for m in list(sys.modules) if m.split(".")[0] in PRELOADED_PACKAGES]
    cache = sys.modules.get("matrice.models.tokenizer_cache")
    pickles = sorted(getattr(cache, "LOADED_PICKLES", ()))
    _notify(path or socket_path(), b"L", {"modules": modules, "tokenizers": pickles})


def stop_servers(directory: Path) -> int:
    """Ask every server with a socket in ``directory`` to leave once its stages are done (a benchmark
    or CI run that started them does not leave them behind); how many were asked."""
    return sum(_notify(path, b"S") for path in sorted(directory.glob("*.sock")))


def hold(path: Path | None = None) -> bool:
    """Keep a running server (none is started) from leaving while this process lives; whether one was reached."""
    try:
        path = path or socket_path()
    except OSError:
        return False
    return path.exists() and _notify(path, b"H", {"pid": os.getpid()})


def run_stage_warm() -> None:
    """Called on importing the `stages` package: a model stage started as `python -m stages.X` runs
    in a warm process and this one exits with its status; any other stage holds a running server
    while it runs; otherwise nothing happens here."""
    module = stage_module()
    if not module or not module.startswith("stages.") or not enabled() or os.environ.get(CHILD_ENV):
        return
    if module.split(".", 1)[1] not in MODEL_STAGES:
        hold()
        return
    try:
        path = socket_path()
    except OSError:
        return
    code = hand_off(module, sys.argv[1:], path)  # while `-m` imports the package, argv[0] is "-m"
    if code is None:
        atexit.register(teach, path)
        return
    sys.exit(code)


# ---- the server's side ---------------------------------------------------------------------------

def serve(path: Path, idle: float, starter: int | None = None) -> None:
    """Answer stage and learning requests on ``path`` until ``idle`` seconds pass with no stage
    running (forked ones, or ``starter``, the cold stage that started the server)."""
    import fcntl

    global SERVER_PATH, _LOCK
    _LOCK = open(path.with_suffix(".lock"), "w")
    try:
        fcntl.flock(_LOCK, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return  # another server holds this key
    SERVER_PATH = path
    import torch  # noqa: F401  (the point of the server)

    if torch.version.cuda is not None or getattr(torch.version, "hip", None) is not None:
        path.with_suffix(".off").write_text("a CUDA/ROCm build of torch: warm start is for CPU builds\n")
        return
    import transformers  # noqa: F401

    if path.exists():
        path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(16)
    listener.settimeout(1.0)
    children: set[int] = set()
    holders: set[int] = set()  # processes that keep the server while they live (:func:`hold`)
    last = time.monotonic()
    stopping = False
    try:
        while children or (not stopping and (_alive(starter) or holders or time.monotonic() - last < idle)):
            _reap(children)
            alive = {h for h in holders if _alive(h)}
            if holders and not alive:
                last = time.monotonic()  # the idle time counts from the last holder's end
            holders.intersection_update(alive)
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                continue
            with conn:
                conn.settimeout(30)
                try:
                    pid = _handle(conn, listener, holders)
                except Exception:  # a broken request must not take the server down
                    pid = None
                stopping = stopping or pid == STOP
                if pid and pid != STOP:
                    children.add(pid)
            last = time.monotonic()
    finally:
        listener.close()
        if path.exists():
            path.unlink()


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def _reap(children: set[int]) -> None:
    for pid in list(children):
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done = pid
        if done:
            children.discard(pid)


STOP = -1  # what _handle returns for a stop request


def _handle(conn: socket.socket, listener: socket.socket, holders: set[int]) -> int | None:
    """Fork a stage for a run request (its pid), learn from a learning request, add a holder, or STOP."""
    kind, fds, _, _ = socket.recv_fds(conn, 1, 3)
    if kind == b"S":
        return STOP
    if kind == b"L":
        _learn(_recv(conn) or {})
        return None
    if kind == b"H":
        pid = int((_recv(conn) or {}).get("pid", 0))
        if pid > 0 and pid != os.getpid():
            holders.add(pid)
        return None
    request = _recv(conn)
    if kind != b"R" or request is None or len(fds) != 3:
        for fd in fds:
            os.close(fd)
        return None
    pid = os.fork()
    if pid == 0:
        listener.close()
        _run_child(conn, fds, request)  # never returns
    for fd in fds:
        os.close(fd)
    return pid


def _learn(message: dict[str, Any]) -> None:
    import pickle

    for name in message.get("modules", []):
        if name.split(".")[0] in PRELOADED_PACKAGES and name not in sys.modules:
            try:
                importlib.import_module(name)
            except Exception:
                pass
    for pickled in message.get("tokenizers", []):
        if pickled not in TOKENIZERS:
            try:
                TOKENIZERS[pickled] = pickle.loads(Path(pickled).read_bytes())
            except Exception:
                pass


def _run_child(conn: socket.socket, fds: list[int], request: dict[str, Any]) -> None:
    """In the forked process: become the stage's process, run its module as `python -m`, report."""
    code = 1
    try:
        _LOCK.close()  # a stage that outlives the server must not keep the next one from starting
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as in any Python process (SIGPIPE stays ignored)
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        for target, fd in enumerate(fds):  # the caller's stdin, stdout, stderr (received as fds >= 3)
            os.dup2(fd, target)
            os.close(fd)
        conn.settimeout(None)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        os.environ[CHILD_ENV] = "1"
        os.umask(request["umask"])
        for name in [m for m in sys.modules if m.split(".")[0] in PROJECT_PACKAGES]:
            del sys.modules[name]
        sys.path[0:0] = [request["cwd"]]
        sys.orig_argv = request.get("orig_argv") or sys.orig_argv
        importlib.invalidate_caches()
        sys.stdout.reconfigure(line_buffering=os.isatty(1))
        _send(conn, {"pid": os.getpid()})
        _watch_caller(conn)
        print(f"{request['module']}: warm start (forked by {SERVER_PATH}; MATRICE_WARM=0 runs cold)", file=sys.stderr)
        code = _run_module(request["module"], request["argv"])
        teach(SERVER_PATH)
    except BaseException:  # failed to become the stage's process: say why on its stderr
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            _send(conn, {"exit": code})
        finally:
            os._exit(code)


def _watch_caller(conn: socket.socket) -> None:
    """End this process when the caller goes away (killed, say, by a signal it cannot forward)."""
    import threading

    def watch() -> None:
        try:
            while conn.recv(1):
                pass
        except OSError:
            pass
        os._exit(137)

    threading.Thread(target=watch, daemon=True).start()


def _run_module(module: str, argv: list[str]) -> int:
    import runpy

    sys.argv = ["-m", *argv]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        code = _exit_status(exc.code)
    except KeyboardInterrupt:
        traceback.print_exc()
        code = 130
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    atexit._run_exitfuncs()
    return code


def _exit_status(value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    print(value, file=sys.stderr)
    return 1

