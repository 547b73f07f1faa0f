"""Warm start: a stage run in a process forked by the server behaves as a cold `python -m` run (its
arguments, cwd, environment, streams and exit status), gets a fresh process each time, dies with its
caller, and the server goes away when idle."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from stages import warm

REPO = Path(__file__).resolve().parents[1]
# The server turns itself off on a CUDA/ROCm build of torch (a forked process cannot use CUDA
# initialised before the fork), so the tests of a serving server need a CPU build.
CUDA_BUILD = torch.version.cuda is not None or getattr(torch.version, "hip", None) is not None
needs_cpu_torch = pytest.mark.skipif(CUDA_BUILD, reason="warm start is off on a CUDA/ROCm build of torch")

PROBE = textwrap.dedent("""
    import json, os, sys, time
    preloaded = "torch" in sys.modules and "transformers" in sys.modules
    import torch
    leaked = hasattr(torch, "_warm_test_marker")
    torch._warm_test_marker = True
    print(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(), "env": os.environ.get("WARM_TEST"),
                      "preloaded": preloaded, "leaked": leaked, "pid": os.getpid(), "name": __name__}), flush=True)
    print("to stderr", file=sys.stderr)
    if sys.argv[1] == "raise":
        raise RuntimeError("the stage failed")
    if sys.argv[1] == "sleep":
        time.sleep(60)
    sys.exit(int(sys.argv[1]))
""")

CLIENT = textwrap.dedent("""
    import sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from stages import warm
    code = warm.hand_off("probe_mod", sys.argv[3:], Path(sys.argv[2]))
    sys.exit(99 if code is None else code)
""")


def start_server(path: Path, idle: float) -> subprocess.Popen:
    """A server on ``path`` as a cold stage starts one (no starter pid to wait for), once it listens."""
    env = {**os.environ, warm.IDLE_ENV: str(idle)}
    proc = subprocess.Popen([sys.executable, "-c", warm.SERVER_MAIN, str(REPO / "stages" / "warm.py"), str(path), "0"],
                            cwd="/", env=env)
    deadline = time.monotonic() + 120
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert path.exists(), "the server never bound its socket"
    return proc


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real server (it imports torch: seconds), started as a cold stage would start it."""
    path = tmp_path_factory.mktemp("warm") / "test.sock"
    proc = start_server(path, idle=120)
    yield path
    proc.terminate()
    proc.wait(30)


@pytest.fixture
def project(tmp_path):
    (tmp_path / "probe_mod.py").write_text(PROBE)
    return tmp_path


def call(server: Path, project: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "WARM_TEST": "from the caller"}
    return subprocess.run([sys.executable, "-c", CLIENT, str(REPO), str(server), *args], cwd=project, env=env,
                          capture_output=True, text=True, timeout=120, **kwargs)


def report(done: subprocess.CompletedProcess) -> dict:
    return json.loads(done.stdout.strip().splitlines()[0])


@needs_cpu_torch
def test_a_warm_stage_sees_its_callers_arguments_cwd_environment_and_streams(server, project):
    done = call(server, project, "3", "gemma3_270m")
    assert done.returncode == 3, done.stderr
    seen = report(done)
    assert seen["argv"] == ["3", "gemma3_270m"]
    assert seen["cwd"] == str(project)
    assert seen["env"] == "from the caller"
    assert seen["name"] == "__main__"
    assert seen["preloaded"], "torch and transformers were not already imported: the process was not warm"
    assert "to stderr" in done.stderr and "probe_mod: warm start" in done.stderr
    assert call(server, project, "0").returncode == 0


@needs_cpu_torch
def test_every_run_gets_a_fresh_process(server, project):
    first, second = report(call(server, project, "0")), report(call(server, project, "0"))
    assert first["pid"] != second["pid"]
    assert not first["leaked"] and not second["leaked"], "state set by one run was visible in the next"


@needs_cpu_torch
def test_an_exception_gives_status_1_and_its_traceback(server, project):
    done = call(server, project, "raise")
    assert done.returncode == 1
    assert "RuntimeError: the stage failed" in done.stderr


@needs_cpu_torch
def test_a_signal_to_the_caller_ends_the_stage(server, project):
    env = {**os.environ, "WARM_TEST": "x"}
    proc = subprocess.Popen([sys.executable, "-c", CLIENT, str(REPO), str(server), "sleep"], cwd=project, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pid = json.loads(proc.stdout.readline())["pid"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) != 0
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid), "the forked stage outlived its caller"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie (exited, not yet reaped by the server) is dead
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@needs_cpu_torch
def test_no_server_runs_cold_and_starts_one_that_leaves_when_idle(tmp_path, project):
    path = tmp_path / "absent.sock"
    env = {**os.environ, warm.IDLE_ENV: "1"}
    started = subprocess.run([sys.executable, "-c", CLIENT, str(REPO), str(path), "0"], cwd=project, env=env,
                             capture_output=True, text=True, timeout=120)
    assert started.returncode == 99  # hand_off answered None: the caller runs cold
    deadline = time.monotonic() + 120
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert path.exists(), "no server was started"
    deadline = time.monotonic() + 60
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not path.exists(), "the idle server did not leave"


def test_only_model_stages_started_with_dash_m_hand_off(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["-m", "gemma3_270m"])  # what `python -m` shows while it locates the module
    monkeypatch.setattr(sys, "orig_argv", [sys.executable, "-m", "stages.select", "gemma3_270m"], raising=False)
    assert warm.stage_module() == "stages.select"
    monkeypatch.setattr(warm, "hand_off", lambda *a: pytest.fail("select loads no model: it must not hand off"))
    warm.run_stage_warm()
    monkeypatch.setattr(sys, "orig_argv", [sys.executable, "-m", "stages.edit", "gemma3_270m"], raising=False)
    monkeypatch.setenv(warm.ENABLE_ENV, "0")
    warm.run_stage_warm()  # turned off: nothing happens
    monkeypatch.setattr(sys, "argv", ["benchmarks/count_flops.py", "out.json", "-m", "stages.edit"])
    monkeypatch.setattr(sys, "orig_argv", [sys.executable, *sys.argv], raising=False)
    assert warm.stage_module() is None  # a script running a stage under runpy (the FLOP counter) keeps it


def test_the_server_key_follows_the_environment(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    one = warm.server_key()
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert warm.server_key() != one
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("OLDPWD", "/somewhere/else")
    assert warm.server_key() == one


def test_model_stages_are_the_stages_that_load_a_model():
    uses_model = {p.stem for p in (REPO / "stages").glob("*.py")
                  if "ModelStage" in p.read_text() or "load_prepared" in p.read_text()}
    assert warm.MODEL_STAGES == uses_model - {"common", "attribute"}  # attribute: long, may start Ray workers


def test_a_forked_stage_takes_the_servers_tokenizer_once(tmp_path, monkeypatch):
    import types

    from matrice.models.tiny import tiny_adapter
    from matrice.models.tokenizer_cache import cache_dir, load_tokenizer, tokenizer_key

    monkeypatch.setenv("MATRICE_CACHE", str(tmp_path / "cache"))
    tiny_adapter("llama").tokenizer.save_pretrained(tmp_path / "model")
    pickled = str(cache_dir() / f"{tokenizer_key(tmp_path / 'model')}.pkl")
    preloaded = object()
    monkeypatch.setitem(sys.modules, warm.REGISTRY, types.SimpleNamespace(TOKENIZERS={pickled: preloaded}))
    assert load_tokenizer(str(tmp_path / "model")) is preloaded
    assert load_tokenizer(str(tmp_path / "model")) is not preloaded  # a second load builds its own


@needs_cpu_torch
def test_stop_servers_ends_a_server_before_its_idle_time(tmp_path):
    path = tmp_path / "stop.sock"
    proc = start_server(path, idle=600)
    assert warm.stop_servers(tmp_path) == 1
    assert proc.wait(30) == 0
    assert not path.exists()


@needs_cpu_torch
def test_a_holding_stage_keeps_the_server_past_its_idle_time_and_the_idle_time_restarts_at_its_end(tmp_path):
    """A stage that loads no model (attribution) holds a running server while it lives: the server
    outlives its idle time meanwhile, and still waits its idle time after the holder ends, so the
    experiment after it starts warm; a holder without a server starts none."""
    idle = 8.0
    path = tmp_path / "hold.sock"
    assert not warm.hold(path) and not path.exists()
    proc = start_server(path, idle=idle)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
                               "from pathlib import Path; from stages import warm; "
                               "print(warm.hold(Path(sys.argv[2])), flush=True); time.sleep(float(sys.argv[3]))",
                               str(REPO), str(path), str(3 * idle)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "True"  # held, before the server's idle time ran out
    time.sleep(2 * idle)
    assert path.exists() and proc.poll() is None, "the server left while a stage held it"
    assert holder.wait(60) == 0
    time.sleep(idle / 3)
    assert path.exists() and proc.poll() is None, "the server left as soon as its holder ended"
    assert proc.wait(60) == 0  # then it leaves when idle
    assert not path.exists()


def test_a_stage_that_loads_no_model_holds_the_server_and_runs_here(monkeypatch):
    """`python -m stages.attribute` (no model through the server) holds a running server and runs in
    its own process; a model stage hands off instead."""
    held, handed = [], []
    monkeypatch.setattr(warm, "hold", lambda path=None: held.append(True) or True)
    monkeypatch.setattr(warm, "hand_off", lambda module, argv, path=None: handed.append(module) or None)
    monkeypatch.setattr(warm, "atexit", type("A", (), {"register": staticmethod(lambda *a: None)}))
    monkeypatch.delenv(warm.CHILD_ENV, raising=False)
    monkeypatch.setenv(warm.ENABLE_ENV, "1")
    for module, model_stage in (("stages.attribute", False), ("stages.manipulate", True)):
        monkeypatch.setattr(sys, "orig_argv", [sys.executable, "-m", module], raising=False)
        monkeypatch.setattr(sys, "argv", ["-m"])
        held.clear()
        handed.clear()
        warm.run_stage_warm()
        assert (held, handed) == (([], [module]) if model_stage else ([True], []))


@pytest.mark.skipif(not CUDA_BUILD, reason="needs a CUDA/ROCm build of torch")
def test_a_cuda_build_turns_warm_start_off_and_stages_run_cold(tmp_path):
    path = tmp_path / "cuda.sock"
    proc = subprocess.Popen([sys.executable, "-c", warm.SERVER_MAIN, str(REPO / "stages" / "warm.py"), str(path), "0"],
                            cwd="/", env={**os.environ, warm.IDLE_ENV: "600"})
    assert proc.wait(120) == 0, "the server did not leave at once"
    assert path.with_suffix(".off").exists() and not path.exists()
    assert warm.hand_off("probe_mod", [], path) is None


def test_a_socket_path_too_long_to_bind_runs_cold_without_starting_a_server(tmp_path):
    path = tmp_path / ("d" * 120) / "x.sock"
    assert warm.hand_off("probe_mod", [], path) is None
    time.sleep(1)
    assert not path.parent.exists() or not any(path.parent.iterdir())
