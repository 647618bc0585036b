#!/usr/bin/env python3
"""txmta side by side with Postfix, in the same run: intake and end-to-end benchmark.

Everything runs on 127.0.0.1 in a private network namespace; see bench/README.md for details.

VARIANTS.  Postfix and txmta with each worker count of --workers (default 1,2: columns
txmta-w1 = `[server] workers = 1`, one process, and txmta-w2 = a master and two worker
processes), each run under each CPU setting of --cpus (default "0,all": the MTA's processes
pinned to CPU 0 with `taskset -c 0`, then unpinned on every core).  Only the MTA is pinned
(txmta's twistd, whose workers inherit the affinity; Postfix's `postfix start-fg`, whose master
and daemons inherit it); smtp-source, smtp-sink, the probe and this script are not.

INTAKE (modes 1/msg, reuse, probe):

    smtp-source --(S sessions)--> MTA 127.0.0.1:2525 --relayhost--> smtp-sink 127.0.0.1:2501
                  probe.py  --(1 session, 50 msg/s)--^

  * "1/msg":  smtp-source opens a new connection for every message (HELO, MAIL, RCPT, DATA, QUIT)
  * "reuse":  smtp-source -d, all messages of a session over one connection
  * accepted msg/s  = N / wall time of smtp-source (it exits after the last 250 and 221)
  * latency p50/p99 = end of data ("\\r\\n.\\r\\n" sent) -> 250 reply, measured by bench/probe.py,
                      a separate client sending one message at a time at 50 msg/s (--probe-rate)
                      during the load
  * "probe": the probe alone at ~100 msg/s (no other load): the latency of an unloaded MTA.

END TO END (modes e2e-1/msg, e2e-reuse, e2e-lat), both MTAs relaying to the sink:
  * "e2e-1/msg", "e2e-reuse": smtp-source as above (no probe) -> MTA -> smtp-sink;
      delivered msg/s = N / (start of smtp-source -> smtp-sink has counted N messages AND the
      MTA's queue is empty: Postfix = files in its queue dirs, txmta = LmdbView(spool).ids()).
  * "e2e-lat": probe.py at a steady 100 msg/s (one connection, one message at a time, each with
      a unique X-Bench-Id header; records the time of each intake 250) -> MTA -> bench/pysink.py
      (records when it has each whole message); latency = sink time - intake 250 time.

CPU.  MTA CPU ms/msg = user+system CPU of all the MTA's processes in the measured window / N,
from a cpuacct cgroup (fallback: /proc).  Per process: utime+stime from /proc/PID/stat of every
process of the MTA, read when the window opens, every 0.1 s and when it closes; txmta's as
"twistd" (workers = 1), "master" and "worker K"; Postfix's summed by process name (smtpd,
cleanup, qmgr, smtp, ...).  "unattributed" = the cgroup's total minus those: CPU of processes
that exited between two readings (Postfix's smtpd and cleanup exit after 100 uses).

Runs are interleaved: for each repetition, for each CPU setting and mode, one run of every
variant, in an order rotated by one per repetition.  Every run starts a fresh MTA instance
with a fresh spool.  --profile adds one e2e run per txmta variant, not counted in the figures,
with py-spy recording each txmta process; the top functions by own time go to the results.

--rss: 100 concurrent sessions each send one 10 MB message to txmta; reports txmta's peak RSS
(VmHWM) and the time taken.

Output: markdown tables on stdout, JSON in bench/results/<date>-{intake,e2e,intake-e2e}.json.
Run as root from the repository root:  .venv/bin/python bench/run.py [--quick] [--only txmta]
[--modes ...] [--workers 1,2] [--cpus 0,all] [--profile]
By default the script re-executes itself in a private network namespace (unshare --net) that has
only a loopback interface, so no packet can leave the machine; --no-sandbox disables that.
"""

import argparse
import datetime
import json
import os
import platform
import pwd
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)
sys.dont_write_bytecode = True    # no bench/__pycache__
import probe  # noqa: E402  (bench/probe.py)

HOST = "127.0.0.1"
SENDER = "bench@example.com"
RCPT = "rcpt@example.net"
HELO = "client.bench.invalid"
SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
TWISTD = os.path.join(REPO, ".venv", "bin", "twistd")
VENV_PY = os.path.join(REPO, ".venv", "bin", "python")
INTAKE_MODES = ("1/msg", "reuse", "probe")
E2E_MODES = ("e2e-1/msg", "e2e-reuse", "e2e-lat")
MODE_ALIASES = {"intake": INTAKE_MODES, "e2e": ("e2e-1/msg", "e2e-reuse"), "latency": ("e2e-lat",),
                "all": INTAKE_MODES + E2E_MODES,
                # the configuration: both loads, intake (with the p99 probe) and e2e
                "default": ("1/msg", "reuse", "e2e-1/msg", "e2e-reuse")}
MODE_NAMES = {"1/msg": "intake, new conn/msg", "reuse": "intake, reuse -d",
              "probe": "probe alone", "e2e-1/msg": "e2e, new conn/msg",
              "e2e-reuse": "e2e, reuse -d", "e2e-lat": "e2e latency"}
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def sh(argv, check=True, **kw):
    """Run a short helper command; return its output (stdout+stderr)."""
    p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=kw.pop("timeout", 60), **kw)
    if check and p.returncode != 0:
        raise RuntimeError("command failed (%d): %s\n%s" % (p.returncode, " ".join(argv), p.stdout))
    return p.stdout


def read_text(path, default="?"):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return default


# --------------------------------------------------------------------------------------------
# Process bookkeeping: every process we start is registered here and killed on exit.
# --------------------------------------------------------------------------------------------

STARTED = []     # Popen objects
CGROUPS = []     # CpuGroup objects


def _die_with_parent():
    """preexec_fn: ask the kernel to SIGTERM the child if this script dies (PR_SET_PDEATHSIG)."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)
    except Exception:
        pass


def spawn(argv, cgroup=None, **kw):
    def pre():
        _die_with_parent()
        if cgroup is not None:
            cgroup.add_self()
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, preexec_fn=pre, **kw)
    STARTED.append(p)
    return p


def stop_process(p, timeout=10, sig=signal.SIGTERM):
    if p is None or p.poll() is not None:
        return
    try:
        p.send_signal(sig)
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(10)
    except ProcessLookupError:
        pass


def cleanup_all():
    for p in reversed(STARTED):
        stop_process(p, timeout=5)
    for cg in CGROUPS:
        cg.remove()


# --------------------------------------------------------------------------------------------
# CPU accounting: a cpuacct cgroup per role (v1 or v2); fallback: /proc process tree.
# --------------------------------------------------------------------------------------------

def proc_children():
    """{ppid: [pid, ...]} for all processes."""
    tree = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            stat = read_text("/proc/%s/stat" % d, "")
            if stat:
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                tree.setdefault(ppid, []).append(int(d))
    return tree


def children(pid):
    """The child processes of `pid`, sorted (a master's workers)."""
    return sorted(proc_children().get(pid, []))


def proc_tree_cpu(root_pid):
    """utime+stime (+ reaped children) of root_pid and all its descendants, in seconds."""
    tree = proc_children()
    total, todo = 0, [root_pid]
    while todo:
        pid = todo.pop()
        f = read_text("/proc/%d/stat" % pid, "")
        if f:
            v = f.rsplit(")", 1)[1].split()
            total += int(v[11]) + int(v[12]) + int(v[13]) + int(v[14])   # utime stime cutime cstime
        todo += tree.get(pid, [])
    return total / os.sysconf("SC_CLK_TCK")


class CpuGroup:
    """A cgroup that only holds processes this script started; .seconds() = their CPU time."""

    def __init__(self, name):
        self.path = self.kind = None
        self.root_pid = None      # for the /proc fallback
        name = "txmta-bench-%d/%s" % (os.getpid(), name)
        for base, kind in (("/sys/fs/cgroup/cpuacct", "v1"), ("/sys/fs/cgroup/unified", "v2"),
                           ("/sys/fs/cgroup", "v2")):
            marker = "cpuacct.usage" if kind == "v1" else "cgroup.procs"
            if not os.path.exists(os.path.join(base, marker)):
                continue
            p = os.path.join(base, name)
            try:
                os.makedirs(p, exist_ok=True)
            except OSError:
                continue
            if kind == "v2" and not os.path.exists(os.path.join(p, "cpu.stat")):
                continue
            self.path, self.kind = p, kind
            break
        CGROUPS.append(self)

    def add_self(self):
        """Runs in the child between fork and exec."""
        if self.path:
            with open(os.path.join(self.path, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))

    def seconds(self):
        if self.path is None:
            return proc_tree_cpu(self.root_pid) if self.root_pid else None
        if self.kind == "v1":
            return int(read_text(os.path.join(self.path, "cpuacct.usage"))) / 1e9
        for line in read_text(os.path.join(self.path, "cpu.stat")).splitlines():
            k, v = line.split()
            if k == "usage_usec":
                return int(v) / 1e6
        return None

    @property
    def source(self):
        return "cgroup-%s" % self.kind if self.path else "proc"

    def pids(self):
        if not self.path:
            return []
        try:
            return [int(x) for x in read_text(os.path.join(self.path, "cgroup.procs"), "").split()]
        except ValueError:
            return []

    def remove(self):
        """Kill whatever is left in the group (all started by us), then remove it."""
        if not self.path:
            return
        for _ in range(50):
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        for p in (self.path, os.path.dirname(self.path)):
            try:
                os.rmdir(p)
            except OSError:
                pass


def machine_busy_seconds():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def thread_cpu(pid):
    """{tid: CPU seconds} of pid's threads, from /proc/PID/task/TID/schedstat (nanoseconds;
    utime+stime in /proc/PID/stat are clock ticks, whose rounding adds up over Postfix's many
    short-lived processes); None where the kernel has no schedstat."""
    out = {}
    try:
        tids = os.listdir("/proc/%d/task" % pid)
    except OSError:
        return out
    for tid in tids:
        v = read_text("/proc/%d/task/%s/schedstat" % (pid, tid), "")
        if not v:
            if not os.path.exists("/proc/%d/task/%s/schedstat" % (pid, tid)):
                return None
            continue
        out[int(tid)] = int(v.split()[0]) / 1e9
    return out


class ProcSampler:
    """CPU time of each process of an MTA over a window: per thread from schedstat (else the
    process's utime+stime from /proc/PID/stat), read at start(), every INTERVAL seconds and at
    stop().  A thread that already ran at start() counts from its reading then, one born later
    from 0; one that exits counts up to its last reading (the rest shows up as the cgroup
    total's unattributed remainder).
    `role(pid, comm, cmdline)` names a process; same names are summed.  Also records each
    process's Cpus_allowed_list (to show that pinning took)."""
    INTERVAL = 0.1

    def __init__(self, cgroup, role):
        self.cgroup, self.role = cgroup, role
        self.first, self.last, self.names, self.comms, self.affinity = {}, {}, {}, {}, {}
        self._started = False
        self._stop = threading.Event()
        self._thread = None

    def _pids(self):
        pids = self.cgroup.pids()
        if pids or self.cgroup.root_pid is None:
            return pids
        tree, out, todo = proc_children(), [], [self.cgroup.root_pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            todo += tree.get(pid, [])
        return out

    def sample(self):
        for pid in self._pids():
            st = read_text("/proc/%d/stat" % pid, "")
            if not st:
                continue
            comm = st[st.find("(") + 1:st.rfind(")")]
            v = st.rsplit(")", 1)[1].split()
            key = (pid, int(v[19]))           # (pid, start time): a reused pid is another process
            threads = thread_cpu(pid)
            if threads is None:
                threads = {0: (int(v[11]) + int(v[12])) / CLK_TCK}
            for tid, cpu in threads.items():
                if (key, tid) not in self.first:
                    self.first[key, tid] = cpu if not self._started else 0.0
                self.last[key, tid] = cpu
            if self.comms.get(key) != comm:   # new, or exec'd since (fork of master -> smtpd)
                self.comms[key] = comm
                cmdline = read_text("/proc/%d/cmdline" % pid, "").replace("\0", " ")
                self.names[key] = self.role(pid, comm, cmdline)
                for line in read_text("/proc/%d/status" % pid, "").splitlines():
                    if line.startswith("Cpus_allowed_list:"):
                        self.affinity[key] = line.split(":", 1)[1].strip()

    def start(self):
        self.sample()
        self._started = True
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(self.INTERVAL):
            try:
                self.sample()
            except Exception:          # a process vanishing mid-read: the next reading has it
                pass

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.sample()

    def by_name(self):
        """{name: {"cpu_s": seconds, "procs": processes seen}}."""
        out = {}
        for key, name in self.names.items():
            e = out.setdefault(name, {"cpu_s": 0.0, "procs": 0})
            e["procs"] += 1
        for (key, tid), cpu in self.last.items():
            out[self.names[key]]["cpu_s"] += cpu - self.first[key, tid]
        return out

    def affinities(self):
        """{Cpus_allowed_list: number of processes}."""
        out = {}
        for a in self.affinity.values():
            out[a] = out.get(a, 0) + 1
        return out


class Window:
    """The measured window of one run: CPU of the MTA (cgroup total and per process), of the
    load generator, and of the whole machine, between start() and stop()."""

    def __init__(self, mta, cg_mta, cg_load):
        self.cg_mta, self.cg_load = cg_mta, cg_load
        self.sampler = ProcSampler(cg_mta, mta.role)
        self.t0 = self.t1 = None

    def start(self):
        self.sampler.start()
        self.cpu0, self.load0, self.busy0 = (self.cg_mta.seconds(), self.cg_load.seconds(),
                                             machine_busy_seconds())
        self.t0 = time.monotonic()
        return self.t0

    def stop(self):
        self.t1 = time.monotonic()
        self.cpu1, self.load1, self.busy1 = (self.cg_mta.seconds(), self.cg_load.seconds(),
                                             machine_busy_seconds())
        self.sampler.stop()
        return self.t1

    def fields(self, messages):
        """The CPU figures of a run, per message of `messages`."""
        if self.cpu0 is None:
            return {}
        cpu = self.cpu1 - self.cpu0
        load = (self.load1 - self.load0) if self.load0 is not None else None
        per = 1000.0 / max(1, messages)
        procs = self.sampler.by_name()
        attributed = sum(e["cpu_s"] for e in procs.values())
        return {"mta_cpu_s": cpu, "mta_cpu_ms_per_msg": cpu * per, "load_cpu_s": load,
                "other_cpu_s": max(0.0, (self.busy1 - self.busy0) - cpu - (load or 0)),
                "processes": {name: dict(e, ms_per_msg=e["cpu_s"] * per)
                              for name, e in sorted(procs.items())},
                "unattributed_cpu_s": cpu - attributed,
                "unattributed_ms_per_msg": (cpu - attributed) * per,
                "affinity": self.sampler.affinities()}


# --------------------------------------------------------------------------------------------
# Helpers: banner wait, smtp-sink, smtp-source
# --------------------------------------------------------------------------------------------

def wait_banner(port, timeout, proc=None):
    """Wait until 127.0.0.1:port answers with a 220 banner (then QUIT)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError("process exited with status %s before its 220 banner" % proc.returncode)
        try:
            with socket.create_connection((HOST, port), timeout=2) as s:
                s.settimeout(5)
                data = s.recv(512)
                if data.startswith(b"220"):
                    try:
                        s.sendall(b"QUIT\r\n")
                        s.recv(512)
                    except OSError:
                        pass
                    return
                last = data
        except OSError as e:
            last = e
        time.sleep(0.1)
    raise RuntimeError("no 220 banner on port %d after %ss (%r)" % (port, timeout, last))


def port_free(port):
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
            return True
        except OSError:
            return False


class Sink:
    """smtp-sink as the relayhost; .count() = transactions received so far (-c counters).
    With python=True: bench/pysink.py instead (same counters; it also timestamps every message
    with an X-Bench-Id header and writes them to RUNDIR/pysink.json when stopped)."""
    COUNTER = re.compile(rb"mesg=(\d+)")

    def __init__(self, port, rundir, cgroup, python=False):
        self.port, self.rundir, self.cgroup, self.python = port, rundir, cgroup, python
        self.proc = self._fh = None
        self._last = 0
        self._tail = b""
        self.result_path = os.path.join(rundir, "pysink.json")

    def start(self):
        out_path = os.path.join(self.rundir, "sink.out")
        if self.python:
            argv = [sys.executable, os.path.join(BENCH, "pysink.py"), "--port", str(self.port),
                    "--out", self.result_path]
        else:
            argv = [SMTP_SINK, "-u", "nobody", "-c", "-m", "1000", "%s:%d" % (HOST, self.port), "1024"]
        with open(out_path, "wb") as out, open(os.path.join(self.rundir, "sink.err"), "wb") as err:
            self.proc = spawn(argv, cgroup=self.cgroup, stdout=out, stderr=err)
        wait_banner(self.port, 10, self.proc)
        self._fh = open(out_path, "rb")

    def count(self):
        """Latest complete "... mesg=N\r" record (a partly written one is kept for the next call)."""
        data = self._fh.read() if self._fh else b""
        if data:
            buf = self._tail + data
            cut = buf.rfind(b"\r")
            if cut < 0:
                self._tail = buf
            else:
                for m in self.COUNTER.finditer(buf, 0, cut):
                    self._last = int(m.group(1))
                self._tail = buf[cut + 1:]
        return self._last

    def result(self):
        """pysink only, after stop(): its JSON (arrival times by X-Bench-Id)."""
        return json.loads(read_text(self.result_path, "{}") or "{}")

    def stop(self):
        stop_process(self.proc, 5)
        if self._fh:
            self._fh.close()


def smtp_source_argv(port, n, sessions, size, reuse):
    argv = [SMTP_SOURCE, "-s", str(sessions), "-m", str(n), "-l", str(size), "-r", "1",
            "-N", "-M", HELO, "-f", SENDER, "-t", RCPT]
    if reuse:
        argv.append("-d")
    return argv + ["%s:%d" % (HOST, port)]


# --------------------------------------------------------------------------------------------
# The two MTAs.  Each instance = one fresh configuration + spool in its own run directory.
# --------------------------------------------------------------------------------------------

def pin_argv(cpus):
    """The prefix that starts a command on `cpus` (a taskset list), or [] for "all"."""
    return [] if cpus in (None, "all") else ["taskset", "-c", cpus]


def cpus_label(cpus):
    return "all %d" % os.cpu_count() if cpus in (None, "all") else "cpu %s" % cpus


class TxMTA:
    """txmta with `[server] workers = workers` (1: one process, no master)."""

    def __init__(self, rundir, port, sink_port, workers=1, cpus=None, extra_server=None,
                 name=None, extra_sections=None):
        self.rundir, self.port, self.sink_port = rundir, port, sink_port
        self.workers, self.cpus = workers, cpus
        self.name = name or "txmta-w%d" % workers
        self.extra_server = dict({"workers": workers}, **(extra_server or {}))
        # other tables: {"intake": {"dedupe_window": '"0"'}} (TOML values)
        self.extra_sections = extra_sections or {}
        self.proc = None
        self.conf = os.path.join(rundir, "txmta.toml")
        self.spool = os.path.join(rundir, "spool")

    @staticmethod
    def env():
        return dict(os.environ, PYTHONPATH=REPO)

    @classmethod
    def unavailable(cls):
        """None if txmta's twistd plugin runs, else the reason why not."""
        if not os.path.exists(TWISTD):
            return "%s missing (run: make venv)" % TWISTD
        p = subprocess.run([TWISTD, "txmta", "--help"], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, env=cls.env(), cwd=REPO, timeout=60)
        if p.returncode != 0:
            return "`twistd txmta --help` fails: " + p.stdout.strip().splitlines()[-1][:300]
        return None

    @classmethod
    def version(cls):
        code = ("import importlib.metadata as m, twisted, txmta;"
                "print(getattr(txmta, '__version__', None) or m.version('txmta'), twisted.__version__)")
        out = sh([VENV_PY, "-c", code], check=False, env=cls.env(), cwd=REPO).split()
        rev = sh(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], check=False).strip()
        dirty = sh(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"], check=False)
        v = {"txmta": out[0] if len(out) == 2 else "?", "twisted": out[1] if len(out) == 2 else "?",
             "git": rev + ("+uncommitted changes" if dirty.strip() else "")}
        return v

    def configure(self):
        os.makedirs(self.spool)
        server = {"hostname": '"bench.txmta.test"'}
        server.update({k: str(v) for k, v in self.extra_server.items()})
        lines = ["[server]"] + ["%s = %s" % kv for kv in server.items()] + [
            "", "[[listen]]", 'address = "%s:%d"' % (HOST, self.port), 'tls = "none"', 'auth = "none"',
            "", "[relay]", 'networks = ["127.0.0.0/8"]',
            "", "[spool]", 'path = "%s"' % self.spool,
            "", "[delivery]", 'relayhost = "%s:%d"' % (HOST, self.sink_port),
            # a mail log file, as Postfix's maillog_file below: each MTA writes its mail log
            # to a file of its own (txmta's default sends the lines through the daemon log)
            "", "[log]", 'maillog = "%s"' % os.path.join(self.rundir, "maillog"), ""]
        for name, table in self.extra_sections.items():
            lines += ["[%s]" % name] + ["%s = %s" % kv for kv in table.items()] + [""]
        with open(self.conf, "w") as f:
            f.write("\n".join(lines))

    def start(self, cgroup):
        with open(os.path.join(self.rundir, "twistd.stdout"), "wb") as out:
            self.proc = spawn(pin_argv(self.cpus) + [
                                  TWISTD, "-n", "--pidfile", os.path.join(self.rundir, "twistd.pid"),
                                  "-l", os.path.join(self.rundir, "twistd.log"),
                                  "txmta", "--config", self.conf],
                              cgroup=cgroup, stdout=out, stderr=subprocess.STDOUT,
                              env=self.env(), cwd=self.rundir)
        cgroup.root_pid = self.proc.pid
        wait_banner(self.port, 30, self.proc)

    def stop(self):
        self.close_view()
        stop_process(self.proc, 20)

    def role(self, pid, comm, cmdline):
        """The name of one of its processes in the per-process CPU figures."""
        if self.proc is not None and pid == self.proc.pid:
            return "twistd" if self.workers == 1 else "master"
        m = re.search(r"txmta\.worker .*--index (\d+)", cmdline)
        return "worker %s" % m.group(1) if m else comm

    def python_pids(self, cgroup):
        """{role: pid} of its Python processes (twistd, master, workers), for py-spy."""
        out = {}
        for pid in cgroup.pids() or [self.proc.pid]:
            name = self.role(pid, "", read_text("/proc/%d/cmdline" % pid, "").replace("\0", " "))
            if name:
                out[name] = pid
        return out

    _view = None

    def queue_len(self):
        """Messages still in the spool: LmdbView(spool).ids() (read-only LMDB view, in-process;
        the harness must run under the virtualenv's python, as `make bench` does)."""
        if self._view is None:
            if REPO not in sys.path:
                sys.path.append(REPO)
            try:
                from txmta.spool.view import LmdbView
            except ImportError as e:
                raise RuntimeError("cannot import txmta.spool.lmdb (%s): run the benchmark with "
                                   "%s" % (e, VENV_PY))
            self._view = LmdbView(self.spool)
        return len(self._view.ids())

    def close_view(self):
        if self._view is not None:
            self._view.close()
            self._view = None

    def settings(self):
        return read_text(self.conf)


POSTFIX_MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command + args
{listen}      inet  n       -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class Postfix:
    """A private Postfix instance: own config dir (RUNDIR/etc) and queue dir, started with
    `postfix -c DIR start-fg`, stopped with `postfix -c DIR stop`, as in the team's reference
    harness /work/shared/bench/peers.py (the main.cf and master.cf below come from there).
    The system-wide postfix service is never touched."""
    name = "postfix"

    def __init__(self, rundir, port, sink_port, hold=False, cpus=None):
        self.rundir, self.port, self.sink_port, self.hold = rundir, port, sink_port, hold
        self.cpus = cpus
        self.etc = os.path.join(rundir, "etc")
        self.spool = os.path.join(rundir, "spool")
        self.proc = None

    @staticmethod
    def unavailable():
        return None if shutil.which("postfix") else "postfix not installed (make debs)"

    @staticmethod
    def version():
        v = sh(["postconf", "-d", "-h", "mail_version"], check=False).strip()
        d = sh(["dpkg-query", "-W", "-f", "${Version}", "postfix"], check=False).strip()
        return "Postfix %s (Debian %s)" % (v, d)

    def configure(self):
        data = os.path.join(self.rundir, "data")
        for d in (self.etc, self.spool, data):
            os.makedirs(d)
        pw = pwd.getpwnam("postfix")
        os.chown(data, pw.pw_uid, pw.pw_gid)
        main = {
            "compatibility_level": "3.6",
            "queue_directory": self.spool,
            "data_directory": data,
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": "mta.bench.invalid",
            "mydomain": "bench.invalid",
            "myorigin": "$myhostname",
            "mydestination": "",
            "local_recipient_maps": "",
            "local_transport": "error:5.1.1 local delivery disabled in benchmark",
            "alias_maps": "",
            "alias_database": "",
            "inet_interfaces": HOST,
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "relayhost": "[%s]:%d" % (HOST, self.sink_port),
            "smtp_dns_support_level": "disabled",
            "maillog_file": os.path.join(self.rundir, "maillog"),
            "maillog_file_prefixes": self.rundir,
            "biff": "no",
            "append_dot_mydomain": "no",
        }
        if self.hold:
            # intake only: every message goes to the hold queue, the queue manager never sees it
            main["smtpd_end_of_data_restrictions"] = "check_client_access static:HOLD"
        with open(os.path.join(self.etc, "main.cf"), "w") as f:
            f.writelines("%s = %s\n" % kv for kv in main.items())
        with open(os.path.join(self.etc, "master.cf"), "w") as f:
            f.write(POSTFIX_MASTER_CF.format(listen="%s:%d" % (HOST, self.port)))
        sh(["postfix", "-c", self.etc, "set-permissions"], check=False)   # creates queue subdirs
        # (without a tty or syslog, postfix's fatal messages go nowhere; to see them run:
        #  script -qc "postfix -c RUNDIR/etc check" /dev/null)
        sh(["postfix", "-c", self.etc, "check"])

    def start(self, cgroup):
        with open(os.path.join(self.rundir, "postfix.stdout"), "wb") as out:
            # under taskset, the master and every daemon it forks inherit the affinity
            self.proc = spawn(pin_argv(self.cpus) + ["postfix", "-c", self.etc, "start-fg"],
                              cgroup=cgroup,
                              stdout=out, stderr=subprocess.STDOUT, cwd=self.rundir)
        cgroup.root_pid = self.proc.pid
        wait_banner(self.port, 30, self.proc)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            sh(["postfix", "-c", self.etc, "stop"], check=False, timeout=30)
            stop_process(self.proc, 20)

    def queue_len(self):
        n = 0
        for q in ("maildrop", "incoming", "active", "deferred"):
            for _, _, files in os.walk(os.path.join(self.spool, q)):
                n += len(files)
        return n

    def settings(self):
        return read_text(os.path.join(self.etc, "main.cf"))

    @staticmethod
    def role(pid, comm, cmdline):
        return comm


# --------------------------------------------------------------------------------------------
# --profile: py-spy on every Python process of txmta during one e2e run
# --------------------------------------------------------------------------------------------

def find_py_spy(given=None):
    for c in (given, shutil.which("py-spy"), os.path.join(REPO, ".venv", "bin", "py-spy")):
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return os.path.abspath(c)
    return None


def start_profilers(py_spy, mta, cgroup, rate, by_line=False):
    """`py-spy record` (raw collapsed stacks, by function or with by_line by line, --nonblocking)
    on each Python process of the MTA; they sample until stop_profilers() interrupts them."""
    spies = []
    for role, pid in sorted(mta.python_pids(cgroup).items()):
        out = os.path.join(mta.rundir, "py-spy-%s.txt" % role.replace(" ", ""))
        with open(out + ".log", "wb") as err:
            p = spawn([py_spy, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw"] +
                      ([] if by_line else ["--function"]) +
                      ["--nonblocking", "--threads", "--output", out],
                      stdout=err, stderr=subprocess.STDOUT)
        spies.append({"role": role, "pid": pid, "proc": p, "out": out, "rate": rate})
    time.sleep(1.0)           # attached (py-spy reads the interpreter's state first)
    for spy in spies:
        if spy["proc"].poll() is not None:
            raise RuntimeError("py-spy on %s (pid %d) exited: %s" % (
                spy["role"], spy["pid"], read_text(spy["out"] + ".log")[-300:]))
    return spies


def stop_profilers(spies, messages, top=15):
    """SIGINT each py-spy (it then writes its file); {role: the top functions by own time}."""
    for spy in spies:
        if spy["proc"].poll() is None:
            spy["proc"].send_signal(signal.SIGINT)
    out = {}
    for spy in spies:
        try:
            spy["proc"].wait(30)
        except subprocess.TimeoutExpired:
            spy["proc"].kill()
        out[spy["role"]] = own_time(spy["out"], spy["rate"], messages, top)
        out[spy["role"]]["pid"] = spy["pid"]
        m = re.search(r"Samples: (\d+) Errors: (\d+)", read_text(spy["out"] + ".log", ""))
        if m:       # samples py-spy could not read (--nonblocking: the stack changed meanwhile)
            out[spy["role"]]["py_spy_errors"] = int(m.group(2))
    return out


def own_time(path, rate, messages, top):
    """From py-spy's raw output (one "frame;frame;...;leaf COUNT" line per stack): samples per
    thread, and the `top` functions by own (leaf) samples, with their share and ms/msg."""
    own, threads, total = {}, {}, 0
    for line in read_text(path, "").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        # --threads puts "thread (0x...)" first (after the "process ..." frame, if any)
        thread = next((f for f in frames[:2] if f.startswith("thread ")), "?")
        leaf = frames[-1]
        total += n
        threads[thread] = threads.get(thread, 0) + n
        own[leaf] = own.get(leaf, 0) + n
    ms = 1000.0 / rate

    def entry(name, n):
        return {"function": name, "samples": n, "share": n / total if total else 0.0,
                "ms_per_msg": n * ms / max(1, messages)}
    return {"file": path, "rate": rate, "samples": total,
            "active_cpu_s_est": total / rate,
            "threads": [entry(k, v) for k, v in sorted(threads.items(), key=lambda kv: -kv[1])],
            "top_own": [entry(k, v) for k, v in sorted(own.items(), key=lambda kv: -kv[1])[:top]]}


# --------------------------------------------------------------------------------------------
# One run = fresh sink + fresh MTA + warm-up + measured load
# --------------------------------------------------------------------------------------------

class Bench:
    def __init__(self, args):
        self.args = args
        self.counter = 0

    def new_mta(self, name, tag, cpus=None, hold=None, **kw):
        """name: "postfix" or "txmta-wN" (N workers); cpus: a taskset list, or "all"."""
        self.counter += 1
        rundir = os.path.join(self.args.workdir, "runs", "%02d-%s-%s-%s" % (
            self.counter, name, "all" if cpus in (None, "all") else "cpu" + cpus, tag))
        shutil.rmtree(rundir, ignore_errors=True)
        os.makedirs(rundir)
        os.chmod(rundir, 0o755)
        if name.startswith("txmta"):
            # "txmta-wN": N workers, [server] cpu_affinity as configured (default "auto");
            # "txmta-wN-free": the same with cpu_affinity = "none" (the kernel places them);
            # "...-nodedupe": the same with [intake] dedupe_window = "0" (the check off)
            workers, free, nodedupe = parse_variant(name)
            extra = dict(self.args.txmta_server, **kw.get("extra_server", {}))
            if free:
                extra["cpu_affinity"] = '"none"'
            kw["extra_server"] = extra
            if nodedupe:
                kw["extra_sections"] = {"intake": {"dedupe_window": '"0"'}}
            return TxMTA(rundir, self.args.port, self.args.sink_port, workers=workers, cpus=cpus,
                         name=name, **kw)
        return Postfix(rundir, self.args.port, self.args.sink_port, cpus=cpus,
                       hold=self.args.postfix_hold if hold is None else hold)

    def run(self, name, mode, idx, cpus="all"):
        """mode: '1/msg', 'reuse' (smtp-source + probe at --probe-rate) or 'probe' (probe alone);
        'e2e-1/msg', 'e2e-reuse' (end-to-end throughput), 'e2e-lat' (end-to-end latency)."""
        if mode in ("e2e-1/msg", "e2e-reuse"):
            return self.run_e2e(name, mode, idx, cpus)
        if mode == "e2e-lat":
            return self.run_latency(name, idx, cpus)
        a = self.args
        n = a.messages if mode != "probe" else None
        tag = {"1/msg": "1msg", "reuse": "reuse", "probe": "probe"}[mode] + "-%d" % idx
        mta = self.new_mta(name, tag, cpus)
        res = {"mta": name, "cpus": cpus, "mode": mode, "run": idx, "n": n, "sessions": a.sessions,
               "size": a.size, "rundir": mta.rundir, "ok": False}
        cg_mta, cg_load = CpuGroup("mta"), CpuGroup("load")
        window = Window(mta, cg_mta, cg_load)
        sink = Sink(a.sink_port, mta.rundir, cg_load)
        src = prb = None
        try:
            sink.start()
            mta.configure()
            res["config"] = mta.settings()
            mta.start(cg_mta)
            res["cpu_source"] = cg_mta.source
            # warm-up: 2 * sessions messages (starts Postfix's smtpd/cleanup processes)
            warm = 2 * a.sessions
            p = subprocess.run(smtp_source_argv(a.port, warm, a.sessions, a.size, False),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
            if p.returncode != 0:
                raise RuntimeError("warm-up: smtp-source rc=%d %s" % (p.returncode, p.stdout[-300:]))
            self.wait_queue_empty(mta, 60)
            time.sleep(0.3)
            os.sync()
            sink0 = sink.count()
            probe_out = os.path.join(mta.rundir, "probe.json")
            rate = a.probe_rate if mode != "probe" else a.probe_only_rate
            max_s = a.timeout if mode != "probe" else a.probe_seconds
            t0 = window.start()
            if mode != "probe":
                with open(os.path.join(mta.rundir, "source.out"), "wb") as out:
                    src = spawn(smtp_source_argv(a.port, n, a.sessions, a.size, mode == "reuse"),
                                cgroup=cg_load, stdout=out, stderr=subprocess.STDOUT)
            with open(os.path.join(mta.rundir, "probe.err"), "wb") as err:
                prb = spawn([sys.executable, os.path.join(BENCH, "probe.py"), "--port", str(a.port),
                             "--rate", str(rate), "--seconds", str(max_s), "--size", str(a.size),
                             "--out", probe_out], cgroup=cg_load, stdout=err, stderr=subprocess.STDOUT)
            waited = src if src is not None else prb
            try:
                waited.wait(a.timeout + 5)
            except subprocess.TimeoutExpired:
                raise RuntimeError("timeout: load did not finish in %ss" % a.timeout)
            t1 = window.stop()
            stop_process(prb, 40)      # the probe finishes its current message, then writes JSON
            pr = json.loads(read_text(probe_out, "{}") or "{}")
            if src is not None and src.returncode != 0:
                raise RuntimeError("smtp-source rc=%d: %s" % (src.returncode, read_text(
                    os.path.join(mta.rundir, "source.out"))[-300:]))
            if not pr.get("ok"):
                raise RuntimeError("probe got no 250: %s" % (pr.get("errors") or read_text(
                    os.path.join(mta.rundir, "probe.err"))[-300:]))
            wall = t1 - t0
            msgs = n if mode != "probe" else pr["ok"]
            # probe-only: the probe's own clock (excludes the ~0.1 s interpreter start-up)
            rate = msgs / wall if mode != "probe" else pr["achieved_rate"]
            res.update(ok=True, wall_s=wall, messages=msgs, rate=rate,
                       probe=pr, probe_msgs=pr["ok"], probe_errors=pr.get("errors", []))
            res.update(window.fields(msgs + (pr["ok"] if mode != "probe" else 0)))
            # Postfix relays to the sink while it accepts; record when that is finished too
            if mta.queue_len() is not None and not (a.postfix_hold and name == "postfix"):
                try:
                    self.wait_queue_empty(mta, 120)
                    t2 = time.monotonic()
                    res["drained_s"] = t2 - t0
                    if window.cpu0 is not None:
                        res["mta_cpu_incl_delivery_s"] = cg_mta.seconds() - window.cpu0
                except RuntimeError as e:
                    res["drain_error"] = str(e)
                res["sink_received"] = sink.count() - sink0
        except Exception as e:
            res["error"] = "%s: %s (logs in %s)" % (type(e).__name__, e, mta.rundir)
        finally:
            stop_process(src, 5)
            stop_process(prb, 5)
            mta.stop()
            cg_mta.remove()
            sink.stop()
            cg_load.remove()
            if not a.keep:
                shutil.rmtree(mta.spool, ignore_errors=True)
        return res

    def start_pair(self, mta, sink, cg_mta, res):
        """Start sink + MTA, send 2 * sessions warm-up messages (1 per connection) and wait until
        they are delivered (sink count) and the MTA's queue is empty."""
        a = self.args
        sink.start()
        mta.configure()
        res["config"] = mta.settings()
        mta.start(cg_mta)
        res["cpu_source"] = cg_mta.source
        warm = 2 * a.sessions
        base = sink.count()
        p = subprocess.run(smtp_source_argv(a.port, warm, a.sessions, a.size, False),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
        if p.returncode != 0:
            raise RuntimeError("warm-up: smtp-source rc=%d %s" % (p.returncode, p.stdout[-300:]))
        deadline = time.monotonic() + 60
        while sink.count() < base + warm or mta.queue_len():
            if time.monotonic() > deadline:
                raise RuntimeError("warm-up not delivered in 60 s (sink %d/%d, queue %s)" % (
                    sink.count() - base, warm, mta.queue_len()))
            time.sleep(0.02)
        time.sleep(0.3)
        os.sync()

    def run_e2e(self, name, mode, idx, cpus="all", profile=False):
        """End-to-end throughput: smtp-source (N messages, S sessions) -> MTA -> smtp-sink.
        delivered msg/s = N / (start of smtp-source -> sink has counted N AND MTA queue empty).
        profile: py-spy records every Python process of the MTA during the window."""
        a = self.args
        n, reuse = a.messages, mode == "e2e-reuse"
        mta = self.new_mta(name, "e2e-%s-%s%d" % ("reuse" if reuse else "1msg",
                                                  "profile-" if profile else "", idx),
                           cpus, hold=False)
        res = {"mta": name, "cpus": cpus, "mode": mode, "run": idx, "n": n, "sessions": a.sessions,
               "size": a.size, "rundir": mta.rundir, "ok": False}
        cg_mta, cg_load = CpuGroup("mta"), CpuGroup("load")
        window = Window(mta, cg_mta, cg_load)
        sink = Sink(a.sink_port, mta.rundir, cg_load)
        src = None
        spies = []
        try:
            self.start_pair(mta, sink, cg_mta, res)
            if profile:
                spies = start_profilers(a.py_spy, mta, cg_mta, a.profile_rate, a.profile_by_line)
            base = sink.count()
            target = base + n
            t0 = window.start()
            with open(os.path.join(mta.rundir, "source.out"), "wb") as out:
                src = spawn(smtp_source_argv(a.port, n, a.sessions, a.size, reuse),
                            cgroup=cg_load, stdout=out, stderr=subprocess.STDOUT)
            t_acc = t_sink = t_done = None
            deadline = t0 + a.timeout
            qcheck_next = 0.0
            while True:           # bounded by the deadline
                now = time.monotonic()
                if t_acc is None and src.poll() is not None:
                    t_acc = now
                    if src.returncode != 0:
                        raise RuntimeError("smtp-source rc=%d: %s" % (src.returncode, read_text(
                            os.path.join(mta.rundir, "source.out"))[-300:]))
                if t_sink is None and sink.count() >= target:
                    t_sink = now
                # the queue is only looked at once the sink has everything (cheap polling)
                if t_acc is not None and t_sink is not None and now >= qcheck_next:
                    if not mta.queue_len():
                        t_done = now
                        break
                    qcheck_next = now + 0.02
                if now > deadline:
                    raise RuntimeError("timeout after %ss: accepted=%s sink=%d/%d queue=%s" % (
                        a.timeout, t_acc is not None, sink.count() - base, n, mta.queue_len()))
                time.sleep(0.005)
            window.stop()
            if spies:
                res["profile"] = stop_profilers(spies, n)
            res.update(ok=True, accept_s=t_acc - t0, sink_done_s=t_sink - t0, e2e_s=t_done - t0,
                       accept_rate=n / (t_acc - t0), rate=n / (t_done - t0))
            res.update(window.fields(n))
            time.sleep(0.2)
            res["sink_received"] = sink.count() - base
        except Exception as e:
            res["error"] = "%s: %s (logs in %s)" % (type(e).__name__, e, mta.rundir)
        finally:
            stop_process(src, 5)
            for spy in spies:
                stop_process(spy["proc"], 5, signal.SIGINT)
            mta.stop()
            cg_mta.remove()
            sink.stop()
            cg_load.remove()
            if not a.keep:
                shutil.rmtree(mta.spool, ignore_errors=True)
        return res

    def run_latency(self, name, idx, cpus="all"):
        """End-to-end latency at a steady rate: probe.py (one connection, one message at a time,
        --lat-rate msg/s, X-Bench-Id header each) -> MTA -> pysink.py (timestamps each id).
        latency = time the sink has the whole message - time the client read the 250 at intake."""
        a = self.args
        mta = self.new_mta(name, "lat-%d" % idx, cpus, hold=False)
        count = a.lat_count
        res = {"mta": name, "cpus": cpus, "mode": "e2e-lat", "run": idx, "target_rate": a.lat_rate,
               "count": count, "size": a.size, "rundir": mta.rundir, "ok": False}
        cg_mta, cg_load = CpuGroup("mta"), CpuGroup("load")
        window = Window(mta, cg_mta, cg_load)
        sink = Sink(a.sink_port, mta.rundir, cg_load, python=True)
        prb = None
        try:
            self.start_pair(mta, sink, cg_mta, res)
            base = sink.count()
            probe_out = os.path.join(mta.rundir, "probe.json")
            max_s = count / a.lat_rate * 1.5 + 10
            t0 = window.start()
            with open(os.path.join(mta.rundir, "probe.err"), "wb") as err:
                prb = spawn([sys.executable, os.path.join(BENCH, "probe.py"), "--port", str(a.port),
                             "--rate", str(a.lat_rate), "--count", str(count), "--seconds", str(max_s),
                             "--size", str(a.size), "--id-prefix", "%s-%d" % (name, idx),
                             "--out", probe_out], cgroup=cg_load, stdout=err, stderr=subprocess.STDOUT)
            try:
                prb.wait(max_s + 30)
            except subprocess.TimeoutExpired:
                raise RuntimeError("probe did not finish in %ss" % (max_s + 30))
            t1 = time.monotonic()
            pr = json.loads(read_text(probe_out, "{}") or "{}")
            if not pr.get("ok"):
                raise RuntimeError("probe got no 250: %s" % (pr.get("errors") or read_text(
                    os.path.join(mta.rundir, "probe.err"))[-300:]))
            # let the last messages arrive (bounded)
            deadline = time.monotonic() + 60
            while sink.count() < base + pr["ok"] or mta.queue_len():
                if time.monotonic() > deadline:
                    res["drain_error"] = "after 60 s: sink %d/%d, queue %s" % (
                        sink.count() - base, pr["ok"], mta.queue_len())
                    break
                time.sleep(0.01)
            t2 = window.stop()
            sink.stop()
            arrivals = sink.result().get("arrivals", {})
            lat, missing = [], 0
            for bid, t250 in zip(pr["ids"], pr["t250"]):
                t = arrivals.get(bid)
                if t is None:
                    missing += 1
                else:
                    lat.append(1000 * (t - t250))
            lat_sorted = sorted(lat)
            res.update(ok=bool(lat), sent=pr["sent"], accepted=pr["ok"], delivered=len(lat),
                       missing=missing, achieved_rate=pr["achieved_rate"], probe_wall_s=t1 - t0,
                       drain_s=t2 - t1, latency_ms=[round(x, 3) for x in lat],
                       intake_ms=pr["samples_ms"], probe_errors=pr.get("errors", []),
                       p50_ms=probe.percentile(lat_sorted, 50),
                       p99_ms=probe.percentile(lat_sorted, 99),
                       max_ms=lat_sorted[-1] if lat_sorted else None,
                       min_ms=lat_sorted[0] if lat_sorted else None,
                       intake_p50_ms=pr.get("p50_ms"), intake_p99_ms=pr.get("p99_ms"))
            res.update(window.fields(pr["ok"]))
        except Exception as e:
            res["error"] = "%s: %s (logs in %s)" % (type(e).__name__, e, mta.rundir)
        finally:
            stop_process(prb, 5)
            mta.stop()
            cg_mta.remove()
            sink.stop()
            cg_load.remove()
            if not a.keep:
                shutil.rmtree(mta.spool, ignore_errors=True)
        return res

    @staticmethod
    def wait_queue_empty(mta, timeout):
        deadline = time.monotonic() + timeout
        while mta.queue_len():
            if time.monotonic() > deadline:
                raise RuntimeError("queue not empty after %ss: %s" % (timeout, mta.queue_len()))
            time.sleep(0.02)

    # ---------------------------------------- memory test -----------------------------------

    def rss(self):
        """--rss: `sessions` concurrent clients each send one message of `mb` MiB to txmta."""
        a = self.args
        sessions, size = a.rss_sessions, a.rss_mb * 1024 * 1024
        # txmta's default max_connections_per_ip (50) would refuse half of the 100 sessions
        mta = self.new_mta("txmta-w1", "rss", extra_server={"max_connections_per_ip": sessions + 10,
                                                          "max_connections": sessions + 10})
        res = {"mta": "txmta", "mode": "rss", "sessions": sessions, "message_bytes": size, "ok": False}
        cg = CpuGroup("mta")
        sink = Sink(a.sink_port, mta.rundir, CpuGroup("load"))
        try:
            sink.start()
            mta.configure()
            mta.start(cg)
            pid = mta.proc.pid
            res["rss_before_mb"] = vm_kb(pid, "VmRSS") / 1024
            clients = [RssClient(a.port, size, i, a.rss_timeout) for i in range(sessions)]
            start = threading.Barrier(sessions + 1, timeout=60)
            threads = [threading.Thread(target=c.run, args=(start,), daemon=True) for c in clients]
            for t in threads:
                t.start()
            cpu0 = cg.seconds()
            start.wait()
            t0 = time.monotonic()
            max_rss = 0
            deadline = t0 + a.rss_timeout
            while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
                max_rss = max(max_rss, vm_kb(pid, "VmRSS"))
                time.sleep(0.05)
            t1 = time.monotonic()
            codes = {}
            for c in clients:
                codes[str(c.code)] = codes.get(str(c.code), 0) + 1
            hwm = vm_kb(pid, "VmHWM")
            # VmHWM is the kernel's peak; the 50 ms samples of VmRSS can read a little higher
            # (the kernel syncs its RSS counters lazily), so report the larger of the two
            res.update(wall_s=t1 - t0, peak_rss_mb=max(hwm, max_rss) / 1024, vmhwm_mb=hwm / 1024,
                       max_sampled_rss_mb=max_rss / 1024, reply_codes=codes,
                       mta_cpu_s=cg.seconds() - cpu0,
                       errors=sorted({c.error for c in clients if c.error})[:5],
                       mb_per_s=sum(1 for c in clients if c.code == 250) * size / 1048576 / (t1 - t0))
            res["ok"] = codes.get("250") == sessions
            if time.monotonic() >= deadline:
                res["error"] = "timeout after %ss" % a.rss_timeout
        except Exception as e:
            res["error"] = "%s: %s" % (type(e).__name__, e)
        finally:
            mta.stop()
            cg.remove()
            sink.stop()
            if not a.keep:
                shutil.rmtree(mta.spool, ignore_errors=True)
        return res


def vm_kb(pid, key):
    for line in read_text("/proc/%d/status" % pid, "").splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


class RssClient:
    """One SMTP session sending one big message (stdlib socket, runs in a thread)."""
    BLOCK = (b"y" * 1022 + b"\r\n") * 64          # 64 KiB of 1 KiB lines

    def __init__(self, port, size, idx, timeout):
        self.port, self.size, self.idx, self.timeout = port, size, idx, timeout
        self.code = None
        self.error = None

    def run(self, barrier):
        conn = None
        try:
            barrier.wait()
            conn = probe.Conn(self.port, min(self.timeout, 300))
            if conn.reply()[0] != 220:
                raise probe.SMTPError("no 220 banner")
            conn.cmd(b"EHLO rss.bench.invalid", 2)
            conn.cmd(b"MAIL FROM:<bench@example.com>", 2)
            conn.cmd(b"RCPT TO:<rss%d@example.net>" % self.idx, 2)
            conn.cmd(b"DATA", 3)
            conn.sock.sendall(b"Subject: rss test %d\r\n\r\n" % self.idx)
            for _ in range(self.size // len(self.BLOCK)):
                conn.sock.sendall(self.BLOCK)
            conn.sock.sendall(b".\r\n")
            self.code, text = conn.reply()
            if self.code != 250:
                self.error = text[:200]
        except Exception as e:
            self.error = "%s: %s" % (type(e).__name__, e)
        finally:
            if conn is not None:
                conn.close()


# --------------------------------------------------------------------------------------------
# Summary and output
# --------------------------------------------------------------------------------------------

def stat(vals, nd=0):
    if not vals:
        return "n/a"
    f = "%%.%df" % nd
    if len(vals) == 1:
        return f % vals[0]
    return (f + " [" + f + "-" + f + "]") % (statistics.median(vals), min(vals), max(vals))


def med(vals):
    return statistics.median(vals) if vals else None


def parse_variant(name):
    """(workers, free, nodedupe) of a txmta variant's name: txmta-wN[-free][-nodedupe]."""
    base, nodedupe, _ = name.partition("-nodedupe")
    base, free, _ = base.partition("-free")
    return (int(base.rpartition("-w")[2]) if "-w" in base else 1), bool(free), bool(nodedupe)


def variant_name(workers, free=False, nodedupe=False):
    return "txmta-w%d%s%s" % (workers, "-free" if free else "", "-nodedupe" if nodedupe else "")


def variant_key(name):
    """postfix first, then txmta by worker count, each bound (cpu_affinity auto) before free,
    each with the duplicate check (the default) before without."""
    if name == "postfix":
        return (0, 0, 0, 0)
    workers, free, nodedupe = parse_variant(name)
    return (1, workers, 1 if free else 0, 1 if nodedupe else 0)


THROUGHPUT_MODES = ("1/msg", "reuse", "e2e-1/msg", "e2e-reuse")


def summarize(results, args):
    """One row per (CPU setting, mode, variant): rates, latency, CPU (total and per process),
    and the ratios of the medians: vs Postfix, vs txmta-w1, vs the first CPU setting."""
    keys = []
    for r in results:
        k = (r.get("cpus", "all"), r["mode"], r["mta"])
        if k not in keys:
            keys.append(k)
    cpus_order = {c: i for i, c in enumerate(args.cpus)}
    mode_order = {m: i for i, m in enumerate(args.modes)}
    keys.sort(key=lambda k: (cpus_order.get(k[0], 99), mode_order.get(k[1], 99), variant_key(k[2])))
    rows, index = [], {}
    for cpus, mode, name in keys:
        rs = [r for r in results if (r.get("cpus", "all"), r["mode"], r["mta"]) == (cpus, mode, name)]
        ok = [r for r in rs if r.get("ok")]
        row = {"cpus": cpus, "mode": mode, "mta": name, "runs": len(rs), "ok": len(ok),
               "errors": [r["error"] for r in rs if r.get("error")] +
                         [r["drain_error"] for r in rs if r.get("drain_error")]}
        if mode == "e2e-lat":
            lat = sorted(x for r in ok for x in r["latency_ms"])
            intake = sorted(x for r in ok for x in r["intake_ms"])
            row.update(rate=[r["achieved_rate"] for r in ok],
                       sent=sum(r["sent"] for r in ok), delivered=sum(r["delivered"] for r in ok),
                       missing=sum(r["missing"] for r in ok), latency_samples=len(lat),
                       p50_ms=probe.percentile(lat, 50), p99_ms=probe.percentile(lat, 99),
                       max_ms=lat[-1] if lat else None, run_p99_ms=[r["p99_ms"] for r in ok],
                       intake_p50_ms=probe.percentile(intake, 50),
                       intake_p99_ms=probe.percentile(intake, 99))
        elif mode in E2E_MODES:
            row.update(rate=[r["rate"] for r in ok], accept_rate=[r["accept_rate"] for r in ok])
        else:
            samples = sorted(s for r in ok for s in r["probe"]["samples_ms"])
            row.update(rate=[r["rate"] for r in ok], latency_samples=len(samples),
                       p50_ms=probe.percentile(samples, 50), p99_ms=probe.percentile(samples, 99),
                       max_ms=samples[-1] if samples else None)
        row["cpu_ms"] = [r["mta_cpu_ms_per_msg"] for r in ok if "mta_cpu_ms_per_msg" in r]
        row["other_cpu_s"] = [r["other_cpu_s"] for r in ok if "other_cpu_s" in r]
        with_procs = [r for r in ok if "processes" in r]
        names = sorted({p for r in with_procs for p in r["processes"]})
        row["processes"] = {p: med([r["processes"].get(p, {}).get("ms_per_msg", 0.0)
                                    for r in with_procs]) for p in names}
        row["process_counts"] = {p: max(r["processes"].get(p, {}).get("procs", 0)
                                        for r in with_procs) for p in names}
        row["unattributed_ms"] = med([r["unattributed_ms_per_msg"] for r in with_procs])
        affinity = {}
        for r in with_procs:
            for a, n in r.get("affinity", {}).items():
                affinity[a] = affinity.get(a, 0) + n
        row["affinity"] = affinity
        rows.append(row)
        index[(cpus, mode, name)] = row

    def ratio(row, other):
        if other is None or not row["rate"] or not other["rate"]:
            return None, []
        by_run = {r["run"]: r["rate"] for r in results if r.get("ok") and
                  (r.get("cpus", "all"), r["mode"], r["mta"]) == (other["cpus"], other["mode"], other["mta"])}
        paired = [r["rate"] / by_run[r["run"]] for r in results if r.get("ok") and r["run"] in by_run
                  and (r.get("cpus", "all"), r["mode"], r["mta"]) == (row["cpus"], row["mode"], row["mta"])]
        return med(row["rate"]) / med(other["rate"]), paired

    for row in rows:
        if row["mode"] not in THROUGHPUT_MODES:
            continue
        cpus, mode, name = row["cpus"], row["mode"], row["mta"]
        if name != "postfix":
            row["vs_postfix"], row["vs_postfix_paired"] = ratio(row, index.get((cpus, mode, "postfix")))
            workers, free, nodedupe = parse_variant(name)
            w1 = variant_name(1, free, nodedupe)
            if name != w1:
                row["vs_w1"], row["vs_w1_paired"] = ratio(row, index.get((cpus, mode, w1)))
            if not nodedupe:        # the duplicate check on / off, same run
                off = index.get((cpus, mode, variant_name(workers, free, True)))
                if off is not None:
                    row["vs_nodedupe"], row["vs_nodedupe_paired"] = ratio(row, off)
        if cpus != args.cpus[0]:
            row["vs_cpus0"], _ = ratio(row, index.get((args.cpus[0], mode, name)))
    return rows


def check_targets(rows, args):
    """The issue's targets, for the txmta variant with the most workers on all CPUs."""
    txmta = sorted({r["mta"] for r in rows if r["mta"] != "postfix"}, key=variant_key)
    bound = [t for t in txmta if not parse_variant(t)[1] and not parse_variant(t)[2]]
    txmta = bound or txmta
    if not txmta or "all" not in args.cpus:
        return []
    big = txmta[-1]
    index = {(r["mode"], r["mta"]): r for r in rows if r["cpus"] == "all"}
    out = []

    def add(what, mode, value, need, at_most=False):
        if mode not in args.modes:
            return
        out.append({"target": what, "mta": big, "mode": mode, "value": value, "need": need,
                    "met": None if value is None else value <= need if at_most else value >= need})
    for mode in ("e2e-1/msg", "e2e-reuse"):
        add("end to end >= 1.8 x Postfix", mode, index.get((mode, big), {}).get("vs_postfix"), 1.8)
    for mode in ("1/msg", "reuse"):
        add("intake >= 2.5 x Postfix", mode, index.get((mode, big), {}).get("vs_postfix"), 2.5)
    for mode in ("1/msg", "reuse"):
        add("p99 end of data -> 250 <= 15 ms under load", mode,
            index.get((mode, big), {}).get("p99_ms"), 15.0, at_most=True)
    if big != "txmta-w1":
        for mode in THROUGHPUT_MODES:
            add("%s >= 1.6 x txmta-w1" % big, mode, index.get((mode, big), {}).get("vs_w1"), 1.6)
    return out


def fmt_processes(row):
    """'worker 0 0.61, worker 1 0.60, master 0.02' (ms/msg, largest first); Postfix's process
    names with the number of processes seen when more than one."""
    items = sorted(row["processes"].items(), key=lambda kv: -(kv[1] or 0))
    parts, small = [], 0.0
    for name, v in items:
        if v is None:
            continue
        if v < 0.005:
            small += v
            continue
        n = row["process_counts"].get(name, 1)
        parts.append("%s%s %.2f" % (name, " (%d)" % n if n > 1 and row["mta"] == "postfix" else "", v))
    if small >= 0.005:
        parts.append("others %.2f" % small)
    u = row.get("unattributed_ms")
    if u is not None and abs(u) >= 0.005:
        parts.append("unattributed %.2f" % u)
    return ", ".join(parts) or "n/a"


def markdown(rows, args):
    f1 = lambda v: "%.1f" % v if v is not None else "-"      # noqa: E731
    f2 = lambda v: "%.2f" % v if v is not None else "-"      # noqa: E731
    multi = len(args.cpus) > 1
    head = ["load", "CPUs", "MTA", "ok/runs", "msg/s med [min-max]", "x Postfix", "x w1"]
    if multi:
        head.append("x %s" % cpus_label(args.cpus[0]))
    head += ["p99 ms", "MTA CPU ms/msg", "CPU ms/msg per process (median)"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [MODE_NAMES[r["mode"]], cpus_label(r["cpus"]), r["mta"], "%d/%d" % (r["ok"], r["runs"]),
                 stat(r["rate"]), f2(r.get("vs_postfix")), f2(r.get("vs_w1"))]
        if multi:
            cells.append(f2(r.get("vs_cpus0")))
        cells += [f1(r.get("p99_ms")), stat(r["cpu_ms"], 2), fmt_processes(r)]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def markdown_latency(rows):
    f = lambda v: "%.1f" % v if v is not None else "n/a"   # noqa: E731
    out = ["| CPUs | MTA | ok/runs | delivered/sent (missing) | msg/s achieved | e2e p50 ms | e2e p99 ms "
           "| e2e max ms | p99 per run med [min-max] | intake 250 p50 / p99 ms |", "|" + "---|" * 10]
    for r in rows:
        if r["mode"] != "e2e-lat":
            continue
        out.append("| %s | %s | %d/%d | %d/%d (%d) | %s | %s | %s | %s | %s | %s / %s |" % (
            cpus_label(r["cpus"]), r["mta"], r["ok"], r["runs"], r["delivered"], r["sent"],
            r["missing"], stat(r["rate"], 1), f(r["p50_ms"]), f(r["p99_ms"]), f(r["max_ms"]),
            stat(r["run_p99_ms"], 1), f(r["intake_p50_ms"]), f(r["intake_p99_ms"])))
    return "\n".join(out)


def markdown_profiles(profiles, top=8):
    out = []
    for p in profiles:
        r = p["result"]
        if not r.get("ok"):
            out.append("- %s: profiled run failed: %s" % (p["mta"], r.get("error")))
            continue
        out.append("\n%s, %s, %s: %.0f msg/s delivered under py-spy (not counted above)\n" % (
            p["mta"], MODE_NAMES[r["mode"]], cpus_label(r["cpus"]), r["rate"]))
        out += ["| process | samples (threads) | function (own time) | share | ms/msg |",
                "|---|---|---|---|---|"]
        for role, prof in sorted(r.get("profile", {}).items()):
            threads = ", ".join("%s %.0f%%" % (t["function"], 100 * t["share"])
                                for t in prof["threads"][:3])
            for i, e in enumerate(prof["top_own"][:top]):
                out.append("| %s | %s | %s | %.1f%% | %.3f |" % (
                    role if i == 0 else "", "%d (%s)" % (prof["samples"], threads) if i == 0 else "",
                    e["function"].replace("|", "\\|"), 100 * e["share"], e["ms_per_msg"]))
    return "\n".join(out)


def machine_info(args):
    info = {"nproc": os.cpu_count(), "kernel": platform.release(),
            "cpu": next((l.split(":", 1)[1].strip() for l in read_text("/proc/cpuinfo").splitlines()
                         if l.startswith("model name")), "?"),
            "mem_total": next((l.split(":", 1)[1].strip() for l in read_text("/proc/meminfo").splitlines()
                               if l.startswith("MemTotal")), "?"),
            "os": read_text("/etc/debian_version"),
            "workdir_fs": sh(["df", "-T", args.workdir], check=False).splitlines()[-1].split()[1],
            "python_harness": platform.python_version(),
            "postfix": Postfix.version(),
            "smtp-source/smtp-sink": "from the postfix package",
            "sandbox": "unshare --net (loopback only)" if os.environ.get("TXMTA_BENCH_SANDBOX") else "none"}
    try:
        info.update(TxMTA.version())
    except Exception as e:
        info["txmta"] = "? (%s)" % e
    return info


def results_path(args):
    """bench/results/<date>-<parts>.json, parts = intake / e2e / intake-e2e (never overwritten)."""
    parts = []
    if any(m in INTAKE_MODES for m in args.modes) or args.rss or args.rss_only:
        parts.append("intake")
    if any(m in E2E_MODES for m in args.modes):
        parts.append("e2e")
    d = os.path.join(BENCH, "results")
    os.makedirs(d, exist_ok=True)
    now = datetime.datetime.now()
    tag = "-".join(parts) or "bench"
    path = os.path.join(d, "%s-%s.json" % (now.strftime("%Y-%m-%d"), tag))
    if os.path.exists(path):       # keep earlier results of the same day
        path = os.path.join(d, "%s-%s.json" % (now.strftime("%Y-%m-%d-%H%M%S"), tag))
    return path


# --------------------------------------------------------------------------------------------
# Sandbox and main
# --------------------------------------------------------------------------------------------

def enter_sandbox():
    """Re-execute this script in a new network namespace (only `lo`) + private mounts."""
    if os.environ.get("TXMTA_BENCH_SANDBOX") == "1":
        sh(["ip", "link", "set", "lo", "up"])
        # any DNS lookup goes to loopback and fails fast
        rc = os.path.join(BENCH, "work", "resolv.conf")
        os.makedirs(os.path.dirname(rc), exist_ok=True)
        with open(rc, "w") as f:
            f.write("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        sh(["mount", "--bind", rc, "/etc/resolv.conf"])
        return
    env = dict(os.environ, TXMTA_BENCH_SANDBOX="1")
    os.execvpe("unshare", ["unshare", "--net", "--mount", "--propagation", "private",
                           sys.executable, os.path.abspath(__file__)] + sys.argv[1:], env)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", "-n", type=int, default=5000, help="messages per smtp-source run")
    ap.add_argument("--sessions", "-s", type=int, default=20, help="smtp-source parallel sessions")
    ap.add_argument("--repeat", type=int, default=3, help="runs per variant, CPU setting and mode")
    ap.add_argument("--workers", default="1,2",
                    help="txmta variants: comma list of worker counts, one column each "
                         "(txmta-w1, txmta-w2, ...; default 1,2)")
    ap.add_argument("--cpus", default="0,all",
                    help="comma list of CPU settings, each run for every variant: a taskset CPU "
                         "list without commas (0, 1, 0-1) that the MTA's processes are pinned to, "
                         "or all (unpinned). Default 0,all")
    ap.add_argument("--affinity", default="auto",
                    help="txmta's [server] cpu_affinity per variant: auto, none or both "
                         "(auto,none); none adds columns txmta-wN-free")
    ap.add_argument("--dedupe", default="on",
                    help="txmta's [intake] dedupe_window per variant: on (the default, 24h), "
                         "off (\"0\") or both (on,off); off adds columns txmta-wN-nodedupe")
    ap.add_argument("--txmta-server", action="append", default=[], metavar="KEY=VALUE",
                    help="an extra [server] setting for every txmta variant (TOML value, e.g. "
                         "max_connections_per_ip=100); repeatable")
    ap.add_argument("--only", help="comma list of variants to run: postfix, txmta (every txmta "
                                   "variant) or txmta-wN")
    ap.add_argument("--quick", action="store_true",
                    help="N=1000, repeat 1, 5 s probe-only run, 500 messages in the latency test")
    ap.add_argument("--modes", default="default",
                    help="comma list of: 1/msg, reuse, probe (intake); e2e-1/msg, e2e-reuse "
                         "(end-to-end throughput); e2e-lat (end-to-end latency); or the groups "
                         "default (1/msg, reuse, e2e-1/msg, e2e-reuse), intake, e2e, latency, all")
    ap.add_argument("--intake", action="store_true", help="only the intake part (= --modes intake)")
    ap.add_argument("--e2e", action="store_true",
                    help="only the end-to-end part (= --modes e2e,latency)")
    ap.add_argument("--profile", action="store_true",
                    help="one more e2e run per txmta variant (on all CPUs, not counted) with "
                         "py-spy recording each txmta process; top functions by own time")
    ap.add_argument("--profile-mode", default="e2e-1/msg", choices=("e2e-1/msg", "e2e-reuse"))
    ap.add_argument("--profile-rate", type=int, default=100, help="py-spy samples per second")
    ap.add_argument("--profile-by-line", action="store_true",
                    help="py-spy's frames by line (which line of a function: e.g. waiting for the "
                         "LMDB write lock or in the commit), not by function")
    ap.add_argument("--py-spy", help="the py-spy program (default: on PATH or in .venv/bin)")
    ap.add_argument("--lat-rate", type=float, default=100.0, help="latency test: msg/s")
    ap.add_argument("--lat-count", type=int, default=3000, help="latency test: messages per run")
    ap.add_argument("--size", type=int, default=4096, help="payload bytes per message")
    ap.add_argument("--probe-rate", type=float, default=50.0, help="probe msg/s during the load")
    ap.add_argument("--probe-only-rate", type=float, default=100.0, help="probe msg/s when alone")
    ap.add_argument("--probe-seconds", type=float, default=10.0, help="length of a probe-only run")
    ap.add_argument("--rss", action="store_true",
                    help="also run the memory test (100 sessions x 10 MB into txmta)")
    ap.add_argument("--rss-only", action="store_true", help="run only the memory test")
    ap.add_argument("--rss-sessions", type=int, default=100)
    ap.add_argument("--rss-mb", type=int, default=10, help="MiB per message in the memory test")
    ap.add_argument("--rss-timeout", type=float, default=600.0)
    ap.add_argument("--postfix-hold", action="store_true",
                    help="Postfix puts every message on hold (intake only, no relaying)")
    ap.add_argument("--timeout", type=float, default=300.0, help="limit per load run, seconds")
    ap.add_argument("--port", type=int, default=2525, help="MTA port on 127.0.0.1")
    ap.add_argument("--sink-port", type=int, default=2501, help="smtp-sink port on 127.0.0.1")
    ap.add_argument("--workdir", default=os.path.join(BENCH, "work"),
                    help="run directories (configs, spools, logs); default bench/work")
    ap.add_argument("--keep", action="store_true", help="keep the spools after each run")
    ap.add_argument("--no-sandbox", action="store_true", help="do not enter a private net namespace")
    args = ap.parse_args()
    if args.quick:
        args.messages, args.repeat, args.probe_seconds = 1000, 1, 5.0
        args.lat_count = min(args.lat_count, 500)
    if args.intake and args.e2e:
        args.modes = "all"
    elif args.intake:
        args.modes = "intake"
    elif args.e2e:
        args.modes = "e2e,latency"
    modes = []
    for m in (m.strip() for m in args.modes.split(",") if m.strip()):
        for x in MODE_ALIASES.get(m, (m,)):
            if x not in INTAKE_MODES + E2E_MODES:
                ap.error("unknown mode %r" % x)
            if x not in modes:
                modes.append(x)
    args.modes = modes
    try:
        workers = sorted({int(w) for w in args.workers.split(",") if w.strip()})
    except ValueError:
        ap.error("--workers: a comma list of integers, e.g. 1,2")
    if not workers or min(workers) < 1:
        ap.error("--workers: worker counts are 1 or more")
    affinity = [a.strip() for a in args.affinity.split(",") if a.strip()]
    if not affinity or set(affinity) - {"auto", "none"}:
        ap.error("--affinity: a comma list of auto and none")
    dedupe = [d.strip() for d in args.dedupe.split(",") if d.strip()]
    if not dedupe or set(dedupe) - {"on", "off"}:
        ap.error("--dedupe: a comma list of on and off")
    args.variants = ["postfix"] + [variant_name(w, a == "none", d == "off")
                                   for w in workers for a in affinity for d in dedupe]
    if args.only:
        wanted = [x.strip() for x in args.only.split(",") if x.strip()]
        for x in wanted:
            if x not in ("postfix", "txmta") and x not in args.variants:
                ap.error("--only: %r is none of postfix, txmta, %s" % (x, ", ".join(args.variants[1:])))
        args.variants = [v for v in args.variants if v in wanted or
                         ("txmta" in wanted and v.startswith("txmta"))]
    args.cpus = [c.strip() for c in args.cpus.split(",") if c.strip()]
    for c in args.cpus:
        if c != "all" and not re.fullmatch(r"\d+(-\d+)?", c):
            ap.error("--cpus: %r is neither all nor a CPU (0) or range (0-1)" % c)
    if not args.cpus:
        ap.error("--cpus: at least one CPU setting")
    if args.profile:
        args.py_spy = find_py_spy(args.py_spy)
        if args.py_spy is None:
            ap.error("--profile needs py-spy (on PATH, in .venv/bin, or --py-spy PATH); "
                     "`make bench` installs it into the virtualenv")
    server = {}
    for kv in args.txmta_server:
        k, sep, v = kv.partition("=")
        if not sep or not k.strip() or not v.strip():
            ap.error("--txmta-server %r: KEY=VALUE" % kv)
        server[k.strip()] = v.strip()
    args.txmta_server = server
    args.workdir = os.path.abspath(args.workdir)
    return args


def rotated(seq, k):
    k %= len(seq) if seq else 1
    return seq[k:] + seq[:k]


def main():
    args = parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (Postfix needs it; the sandbox needs unshare)")
    if not args.no_sandbox:
        enter_sandbox()

    def on_term(signum, frame):
        raise KeyboardInterrupt("signal %d" % signum)
    signal.signal(signal.SIGTERM, on_term)

    for port in (args.port, args.sink_port):
        if not port_free(port):
            sys.exit("port %d on %s is in use" % (port, HOST))
    if any(c != "all" for c in args.cpus) and not shutil.which("taskset"):
        sys.exit("--cpus %s needs taskset (util-linux)" % ",".join(args.cpus))
    os.makedirs(args.workdir, exist_ok=True)

    skipped = {}
    for kind, cls in (("postfix", Postfix), ("txmta", TxMTA)):
        if any(v.startswith(kind) for v in args.variants):
            why = cls.unavailable()
            if why:
                log("SKIP %s: %s" % (kind, why))
                skipped[kind] = why
    variants = [v for v in args.variants if v.split("-")[0] not in skipped]

    out = {"started": datetime.datetime.now().isoformat(timespec="seconds"), "argv": sys.argv[1:],
           "machine": machine_info(args), "loadavg_before": read_text("/proc/loadavg"),
           "settings": {"txmta_server": args.txmta_server, "messages": args.messages, "sessions": args.sessions, "size": args.size,
                        "repeat": args.repeat, "variants": variants, "cpus": args.cpus,
                        "pinning": "taskset -c CPUS on the MTA's first process (txmta's twistd, "
                                   "Postfix's `postfix start-fg`), inherited by every process it "
                                   "starts; load generator, sink, probe and harness unpinned",
                        "probe_rate": args.probe_rate,
                        "probe_only_rate": args.probe_only_rate, "probe_seconds": args.probe_seconds,
                        "modes": args.modes, "lat_rate": args.lat_rate, "lat_count": args.lat_count,
                        "postfix_hold": args.postfix_hold, "profile": args.profile,
                        "load_1msg": " ".join(smtp_source_argv(args.port, args.messages, args.sessions,
                                                               args.size, False)),
                        "load_reuse": " ".join(smtp_source_argv(args.port, args.messages, args.sessions,
                                                                args.size, True))},
           "skipped": skipped, "results": [], "profiles": []}
    bench = Bench(args)
    interrupted = False
    began = time.monotonic()
    try:
        if not args.rss_only:
            # interleaved: per repetition, per CPU setting and mode, one run of every variant,
            # in an order rotated by one each repetition
            for i in range(1, args.repeat + 1):
                for cpus in args.cpus:
                    for mode in args.modes:
                        for name in rotated(variants, i - 1):
                            r = bench.run(name, mode, i, cpus)
                            log("%-9s %-9s %-8s #%d %4.0fs: %s" % (
                                name, cpus_label(cpus), mode, i, time.monotonic() - began, {
                                    k: (round(v, 2) if isinstance(v, float) else v)
                                    for k, v in r.items()
                                    if k in ("rate", "accept_rate", "mta_cpu_ms_per_msg", "delivered",
                                             "missing", "p50_ms", "p99_ms", "intake_p99_ms",
                                             "affinity", "error", "drain_error")}
                                | ({"p99_ms": round(r["probe"]["p99_ms"], 2)}
                                   if r.get("ok") and "probe" in r else {})))
                            out["results"].append(r)
            if args.profile:
                cpus = "all" if "all" in args.cpus else args.cpus[-1]
                for name in (v for v in variants if v.startswith("txmta")):
                    r = bench.run_e2e(name, args.profile_mode, 1, cpus, profile=True)
                    log("%-9s %-9s profiled %s: %s" % (name, cpus_label(cpus), args.profile_mode,
                                                       r.get("error") or "%.0f msg/s" % r["rate"]))
                    out["profiles"].append({"mta": name, "result": r})
        if (args.rss or args.rss_only) and "txmta" not in skipped:
            r = bench.rss()
            log("rss: %s" % r)
            out["rss"] = r
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: cleaning up")
    finally:
        cleanup_all()

    out["elapsed_s"] = time.monotonic() - began
    out["loadavg_after"] = read_text("/proc/loadavg")
    out["interrupted"] = interrupted
    out["summary"] = summarize(out["results"], args)
    out["targets"] = check_targets(out["summary"], args)
    path = results_path(args)
    with open(path, "w") as f:
        json.dump(out, f, indent=1)

    m = out["machine"]
    print("## txmta benchmark (%s), %s\n" % (", ".join(args.modes), out["started"]))
    print("Machine: %s CPUs (%s), %s, kernel %s, Debian %s, spool fs %s. %s; txmta %s (git %s), "
          "Twisted %s.\n" % (m["nproc"], m["cpu"], m["mem_total"], m["kernel"], m["os"],
                             m["workdir_fs"], m["postfix"], m.get("txmta"), m.get("git"),
                             m.get("twisted")))
    print("Load: %d sessions x %d messages of %d B per run; %d interleaved run(s) per cell; "
          "%.0f min in all.%s\n" % (args.sessions, args.messages, args.size, args.repeat,
                                    out["elapsed_s"] / 60, "" if not args.txmta_server else
                                    " txmta [server] also has: %s." % ", ".join(
                                        "%s = %s" % kv for kv in args.txmta_server.items())))
    pinned = [c for c in args.cpus if c != "all"]
    if pinned:
        seen = {}
        for row in out["summary"]:
            if row["cpus"] in pinned:
                for a, n in row["affinity"].items():
                    seen[a] = seen.get(a, 0) + n
        print("CPUs: \"%s\" = the MTA's processes pinned with `taskset -c %s` (txmta's twistd master "
              "and its workers, Postfix's master and every daemon it starts); smtp-source, "
              "smtp-sink, the probe and this script are NOT pinned. Affinity "
              "(Cpus_allowed_list) of the MTA processes seen in those runs: %s. \"all %d\" = "
              "unpinned.\n" % (cpus_label(pinned[0]), pinned[0],
                               ", ".join("%s: %d" % kv for kv in sorted(seen.items())) or "n/a",
                               os.cpu_count()))
    if out["summary"]:
        print(markdown(out["summary"], args))
        print("\nmsg/s: intake rows = accepted (N / smtp-source wall time), e2e rows = delivered "
              "(N / time until the sink has all and the queue is empty), median [min-max] of the "
              "runs. x Postfix, x w1, x %s: ratios of the medians (same load and CPUs). p99: "
              "intake rows = probe's end of data -> 250 at %g msg/s during the load; e2e latency "
              "= intake 250 -> sink. MTA CPU ms/msg: all the MTA's processes (cgroup). Per "
              "process: txmta's master / workers (twistd = workers 1), Postfix's daemons summed "
              "by name (number of processes seen); unattributed = processes that exited between "
              "two readings.\n" % (cpus_label(args.cpus[0]), args.probe_rate))
    if any(r["mode"] == "e2e-lat" for r in out["summary"]):
        print("### End-to-end latency at a steady %g msg/s (relayhost = bench/pysink.py)\n"
              % args.lat_rate)
        print(markdown_latency(out["summary"]))
        print()
    dedupe = [r for r in out["summary"] if r.get("vs_nodedupe") is not None]
    if dedupe:
        print("### The duplicate check, on / off ([intake] dedupe_window = \"24h\" / \"0\")\n")
        for r in dedupe:
            off = variant_name(parse_variant(r["mta"])[0], parse_variant(r["mta"])[1], True)
            print("- %s, %s, %s: %s vs %s msg/s (%s): %.3f of off's median (per run: %s)" % (
                MODE_NAMES[r["mode"]], cpus_label(r["cpus"]), r["mta"], stat(r["rate"]),
                stat([x for x in out["summary"] if (x["cpus"], x["mode"], x["mta"]) ==
                      (r["cpus"], r["mode"], off)][0]["rate"]), off, r["vs_nodedupe"],
                ", ".join("%.3f" % x for x in r["vs_nodedupe_paired"])))
        print()
    if out["targets"]:
        print("### Targets (%s, all CPUs)\n" % out["targets"][0]["mta"])
        for t in out["targets"]:
            print("- %s, %s: %s" % (t["target"], MODE_NAMES[t["mode"]], "n/a (no successful run)"
                                    if t["value"] is None else "%.2f %s" % (
                                        t["value"], "met" if t["met"] else "NOT met")))
        print()
    if out["profiles"]:
        print("### Profiles (py-spy, own time, top functions per process)")
        print(markdown_profiles(out["profiles"]))
        print()
    for row in out["summary"]:
        for e in row["errors"]:
            print("- error %s %s %s: %s" % (row["mta"], cpus_label(row["cpus"]), row["mode"], e))
    for name, why in skipped.items():
        print("- skipped %s: %s" % (name, why))
    if "rss" in out:
        r = out["rss"]
        print("\nMemory test (txmta): %d sessions x %d MiB: peak RSS (VmHWM) %.0f MB (before: %.0f MB), "
              "%.1f s, replies %s%s" % (r["sessions"], r["message_bytes"] // 1048576,
                                       r.get("peak_rss_mb", 0), r.get("rss_before_mb", 0),
                                       r.get("wall_s", 0), r.get("reply_codes"),
                                       ", error: " + r["error"] if r.get("error") else ""))
    print("\nJSON: %s" % os.path.relpath(path, REPO))
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
