"""Python processes that start with the training stack already imported, for the tests that run train_grpo.py whole.

Each `python train_grpo.py` spends ~11 s of its start on 2 cores importing torch, transformers, TRL, PEFT and
datasets, more than a 3-step tiny run trains; the suite starts ~25 of them. Here one server process imports them
once and forks a child for each run: the child is a process of its own (its pid takes signals, a SIGKILL ends it and
nothing else, its files and exit status are its own) that sets the caller's environment, working directory, umask and
argv, runs the script as `__main__` as the program itself (so that the interpreter ends it: SystemExit's code, 1
after a traceback, death by SIGINT after an uncaught KeyboardInterrupt, atexit functions, threads joined) and writes
its stdout and stderr to files that the caller reads.

The server imports the libraries and computes nothing: a child forked after torch ran a parallel region hangs at
its own first one (GNU libgomp's pool does not survive a fork), while a child of a process that only imported torch
runs torch's parallel ops on its OMP_NUM_THREADS threads; it refuses to serve if the imports initialised CUDA.
Variables that a library reads when it is imported are the server's (the test process's environment, with
OMP_NUM_THREADS set), what a library prints while it is imported or once a process went to the server's output,
and every child shares the server's string-hash seed: a test that changes such a variable, checks everything a run
prints, or compares runs across processes runs a real `subprocess` instead.

Not a test module: the test files import it (pytest puts tests/ on sys.path).
"""

import atexit
import codecs
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SERVER = r"""
import json, os, runpy, signal, sys, traceback, types
import accelerate, datasets, pandas, peft, torch, transformers, trl  # what every run imports: ~11 s on 2 cores
from trl import GRPOConfig, GRPOTrainer

replies = os.fdopen(os.dup(1), "w", buffering=1)
requests = os.fdopen(os.dup(0), "r")
null = os.open(os.devnull, os.O_RDWR)
os.dup2(null, 0)
os.dup2(null, 1)
if torch.cuda.is_initialized():  # a forked child could not use CUDA
    print(json.dumps({"error": "the server initialised CUDA while importing: a forked run could not use it"}),
          file=replies)
    sys.exit(1)


def set_up(request):
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(f, fd)
        os.close(f)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    os.umask(request["umask"])
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    sys.argv = request["argv"]
    if request["code"] is not None:
        sys.path[0] = ""
        sys.modules["__main__"] = types.ModuleType("__main__")  # the code's own namespace, as under -c
    else:
        sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))


print(json.dumps({"ready": True}), file=replies)
request = None
for line in iter(requests.readline, ""):
    pid = os.fork()
    if pid == 0:
        try:
            replies.close()
            requests.close()
            request = json.loads(line)
            set_up(request)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        break  # the child leaves the server's loop: from here on it is the program that runs the script
    print(json.dumps({"pid": pid}), file=replies)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), file=replies)
if request is None:
    sys.exit(0)  # the server, once its requests end
# The child runs the script as `python script` / `python -c code` would, and lets the interpreter end the process:
# its exit status, the traceback of an uncaught exception, death by SIGINT after an uncaught KeyboardInterrupt,
# atexit functions and the joining of threads are the interpreter's own.
if request["code"] is not None:
    exec(compile(request["code"], "<string>", "exec"), sys.modules["__main__"].__dict__)
else:
    runpy.run_path(os.path.abspath(sys.argv[0]), run_name="__main__")
"""


class PreloadedPython:
    """The server: `start(argv)` forks a run, one at a time. argv is what follows `python`: a script and its
    arguments, or "-c", code and its arguments."""

    def __init__(self, env, cwd):
        self.cwd, self.runs = str(cwd), []  # every run started; the last may still be running
        self.server = subprocess.Popen([sys.executable, "-c", SERVER], cwd=cwd, env=env, stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True)
        self.pending = b""
        if self.reply(timeout=300) is None:
            self.server.kill()
            raise RuntimeError("the preloaded Python server did not start within 300 s")

    def reply(self, timeout=None):
        """The server's next reply (a dict), or None when none came within `timeout` seconds (None: wait). Lines
        are split here from what os.read returns, so that no reply waits in a buffer that select cannot see."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            with selectors.DefaultSelector() as selector:
                selector.register(self.server.stdout, selectors.EVENT_READ)
                if not selector.select(left):
                    return None
            data = os.read(self.server.stdout.fileno(), 65536)
            if not data:
                raise RuntimeError(f"the preloaded Python server ended (exit status {self.server.wait()})")
            self.pending += data
        line, self.pending = self.pending.split(b"\n", 1)
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return answer

    def start(self, argv, env):
        """A running child (PreloadedRun) of `python *argv` with environment `env` in the server's directory. A run
        that a failed test left running is killed first: the server serves one at a time."""
        self.stop_running()
        return PreloadedRun(self, [str(a) for a in argv], env)

    def run(self, argv, env, timeout=900):
        """As subprocess.run(capture_output=True, text=True): a CompletedProcess once the child has ended."""
        child = self.start(argv, env)
        stdout, stderr = child.communicate(timeout=timeout)
        return subprocess.CompletedProcess([sys.executable, *child.argv], child.returncode, stdout, stderr)

    def stop_running(self):
        """Kill and reap the last run if it is still going (only one runs at a time)."""
        if self.runs and self.runs[-1].poll() is None:
            self.runs[-1].kill()
            self.runs[-1].wait()

    def close(self):
        self.stop_running()
        for run in self.runs:
            shutil.rmtree(run.files, ignore_errors=True)
        self.server.stdin.close()
        try:
            self.server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.server.kill()
            self.server.wait()


class PreloadedRun:
    """What a test uses of subprocess.Popen: pid, send_signal, stdout.readline, communicate, returncode."""

    def __init__(self, server, argv, env):
        self.server, self.argv, self.returncode = server, argv, None
        self.files = Path(tempfile.mkdtemp(prefix="preloaded-run-"))
        server.runs.append(self)
        code = argv[1] if argv[0] == "-c" else None
        umask = os.umask(0)
        os.umask(umask)
        request = {"argv": ["-c", *argv[2:]] if code is not None else argv, "code": code, "env": dict(env),
                   "cwd": server.cwd, "umask": umask, "stdout": str(self.files / "stdout"),
                   "stderr": str(self.files / "stderr")}
        server.server.stdin.write(json.dumps(request) + "\n")
        server.server.stdin.flush()
        answer = server.reply(timeout=60)
        if answer is None or "pid" not in answer:
            raise RuntimeError(f"the preloaded Python server did not start the run (it answered {answer})")
        self.pid = answer["pid"]
        self.stdout = LineReader(self.files / "stdout", self.poll)

    def poll(self):
        try:
            return self.wait(timeout=0)
        except subprocess.TimeoutExpired:
            return None

    def send_signal(self, number):
        if self.poll() is None:
            try:
                os.kill(self.pid, number)
            except ProcessLookupError:  # it ended since: the server's reply says how
                pass

    def kill(self):
        self.send_signal(signal.SIGKILL)

    def wait(self, timeout=None):
        if self.returncode is None:
            answer = self.server.reply(timeout=timeout)
            if answer is None:
                raise subprocess.TimeoutExpired(self.argv, timeout)
            self.returncode = answer["returncode"]
        return self.returncode

    def communicate(self, timeout=None):
        """Wait for the end; (stdout, stderr) as text, all of it (a child killed at the timeout is reaped first)."""
        try:
            self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.wait()
            raise
        return tuple((self.files / name).read_text(errors="replace") if (self.files / name).exists() else ""
                     for name in ("stdout", "stderr"))


class LineReader:
    """readline() over a file a running child appends to: a whole line, or "" once the child has ended."""

    def __init__(self, path, ended):
        self.path, self.ended, self.offset, self.buffer = path, ended, 0, ""
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def readline(self):
        while True:
            if "\n" in self.buffer:
                line, self.buffer = self.buffer.split("\n", 1)
                return line + "\n"
            finished = self.ended() is not None  # read once more after the end: what it wrote last
            if self.path.exists():
                with open(self.path, "rb") as f:
                    f.seek(self.offset)
                    data = f.read()
                self.offset += len(data)
                self.buffer += self.decoder.decode(data, final=finished)
            if "\n" in self.buffer:
                continue
            if finished:
                line, self.buffer = self.buffer, ""
                return line
            time.sleep(0.05)


_shared = {}


def shared(cwd, env):
    """The one server of this test process for `cwd` and `env` (the environment its libraries are imported in),
    started at the first call (~11 s) and closed at exit; another environment gets a server of its own."""
    key = (str(cwd), tuple(sorted(env.items())))
    if key not in _shared:
        _shared[key] = PreloadedPython(env, cwd)
        atexit.register(_shared[key].close)
    return _shared[key]
