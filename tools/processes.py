"""Linux process helpers for the launcher: children and states from /proc, parent-death signals,
child subreaping, and the server's POSIX shared-memory regions."""
import ctypes
import glob
import os
import signal

SHM_DIR = "/dev/shm"        # where shm_open() regions live on Linux
STUB_COMM = "triton_python_b"   # the kernel keeps 15 characters of "triton_python_backend_stub"
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_libc = ctypes.CDLL(None, use_errno=True)   # loaded before any fork: preexec functions only call it


def become_subreaper():
    """Orphaned descendants (a stub whose tritonserver died) are re-parented to us instead of to
    init, so that we can see, kill and reap them. Returns False where the kernel refuses."""
    return _libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def die_with_parent(parent_pid, sig=signal.SIGTERM):
    """A preexec function: the child gets `sig` when the launcher dies, even by SIGKILL, so that a
    killed launcher never leaves a server behind. SIGTERM lets Triton unload its models."""
    def preexec():
        _libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent_pid:   # the launcher died before prctl took effect
            os._exit(1)
    return preexec


def read_stat(pid):
    """(comm, state, ppid) of a process, or None once it is gone (reaped)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    # comm may hold spaces and parentheses: it runs from the first '(' to the last ')'.
    comm = data[data.index("(") + 1:data.rindex(")")]
    state, ppid = data[data.rindex(")") + 2:].split()[:2]
    return comm, state, int(ppid)


def children_of(pid):
    """Pids of pid's children: from /proc/PID/task/*/children (each thread has its own list), else
    a scan of every process's parent (kernels without CONFIG_PROC_CHILDREN)."""
    paths = glob.glob(f"/proc/{pid}/task/*/children")
    if paths:
        kids = set()
        for path in paths:
            try:
                with open(path) as f:
                    kids.update(int(x) for x in f.read().split())
            except OSError:
                pass   # the thread ended meanwhile
        return kids
    kids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = read_stat(int(entry))
            if stat and stat[2] == pid:
                kids.add(int(entry))
    return kids


def stub_instance(pid):
    """The model instance a live stub serves (e.g. 'llm_0_0'), from its command line; None if unknown.
    The stub's arguments end with: ... <parent pid> <backend dir> <ipc size> <instance name> <kind>."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().decode("utf-8", "replace").split("\0")
    except OSError:
        return None
    argv = [a for a in argv if a]
    return argv[-2] if len(argv) >= 3 else None


def stubs_of(server_pid):
    """{pid: state} of the Python-backend stubs the server started (zombies included: state 'Z')."""
    stubs = {}
    for pid in children_of(server_pid):
        stat = read_stat(pid)
        if stat and stat[0] == STUB_COMM:
            stubs[pid] = stat[1]
    return stubs


def kill_group(pgid, sig=signal.SIGKILL):
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def reap_children():
    """Reap every exited child without blocking; returns {pid: exit code (negative: signal)}."""
    reaped = {}
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return reaped
        if pid == 0:
            return reaped
        reaped[pid] = os.waitstatus_to_exitcode(status)


def remove_shm_regions(prefix):
    """Remove the shared-memory regions whose names start with prefix; returns their names."""
    if not prefix:          # never "every region"
        return []
    removed = []
    for path in glob.glob(os.path.join(SHM_DIR, glob.escape(prefix) + "*")):
        try:
            os.unlink(path)
            removed.append(os.path.basename(path))
        except OSError:
            pass
    return removed
