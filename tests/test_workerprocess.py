"""Starting a program as a user in a cgroup of its own: real processes under spice-test-a, a real
cgroup v2 directory of the test's own; the exit known from the process, not its pipes."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from spice_streamd import cgroup, workerprocess
from spice_streamd.caller import Caller
from spice_streamd.verifier import read_as_caller
from tests.support.bus import ensure_test_user
from tests.support.cgroupfs import alive, cgroup_of, relative, scratch_cgroup
from tests.support.hostile import SPAWN_CHILDREN
from tests.support.waiting import wait_async, wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runs programs as other uids")

ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}

# Starts children that outlive it unless something ends them: two `setsid sleep` holding its
# stdout/stderr (another session, another process group), and a daemon (double fork, setsid) whose
# parent has exited. Writes their pids and its own cgroup to argv[1]; then exits with argv[2], or
# stays ("stay").
SPAWNER = r'''
import json, os, signal, subprocess, sys
out, then = sys.argv[1], sys.argv[2]
''' + SPAWN_CHILDREN + r'''
with open(out + ".tmp", "w") as f:
    json.dump({"pid": os.getpid(), "children": pids, "cgroup": cg}, f)
os.rename(out + ".tmp", out)
if then == "stay":
    while True:
        signal.pause()
sys.exit(int(then))
'''


@pytest.fixture
def user_a():
    return ensure_test_user("spice-test-a")


@pytest.fixture
def workdir():
    d = tempfile.mkdtemp(prefix="spice-wp-")
    os.chmod(d, 0o777)  # the programs under test write their records here
    script = os.path.join(d, "spawner.py")
    with open(script, "w") as f:
        f.write(SPAWNER)
    os.chmod(script, 0o644)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def tree():
    with scratch_cgroup() as path:
        yield cgroup.Tree(path)


def read_record(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass


async def start(user, argv, tree, **kw) -> workerprocess.UserProcess:
    return await workerprocess.start_as(
        argv, uid=user.pw_uid, gid=user.pw_gid, groups=(), env=ENV,
        stdout=kw.pop("stdout", subprocess.DEVNULL), stderr=kw.pop("stderr", subprocess.PIPE),
        kind="worker", limits=cgroup.WORKER_LIMITS, cgroups=tree, **kw)


# ---- finding 4: what a program starts ends with it --------------------------------------------

def test_everything_a_program_started_ends_with_its_cgroup_and_the_cgroup_goes(user_a, workdir,
                                                                                tree):
    """Joined before exec: the program and all it starts (setsid, a daemon reparented to init) are
    in its cgroup, which one kill empties; then the cgroup is removed."""
    out = os.path.join(workdir, "rec.json")

    async def run():
        child = await start(user_a, [sys.executable, os.path.join(workdir, "spawner.py"), out,
                                     "stay"], tree)
        rec = await wait_async(lambda: read_record(out), timeout=15, what="the spawner's record")
        try:
            mine = relative(child.cgroup.path)
            assert rec["cgroup"] == mine  # its own first view of itself: already inside
            assert os.path.basename(mine).startswith("worker-")
            for pid in rec["children"]:
                assert cgroup_of(pid) == mine, f"child {pid} outside the worker's cgroup"
            if "pids" in tree.controllers:
                with open(os.path.join(child.cgroup.path, "pids.max")) as f:
                    assert f.read().strip() == str(cgroup.WORKER_LIMITS.pids)
            if "memory" in tree.controllers:
                with open(os.path.join(child.cgroup.path, "memory.max")) as f:
                    assert f.read().strip() == str(cgroup.WORKER_LIMITS.memory)
            assert all(alive(p) for p in [child.pid, *rec["children"]])
            child.kill_all()
            assert await asyncio.wait_for(child.exited(), 5) == -9
            await child.end_rest()
            child.close_pipes()
            for pid in [child.pid, *rec["children"]]:
                wait_until(lambda pid=pid: not alive(pid), timeout=5, what=f"pid {pid} to go")
            assert not os.path.exists(child.cgroup.path)
        finally:
            kill_all(rec["children"])

    asyncio.run(run())


def test_its_exit_is_known_while_a_child_holds_its_pipes_and_the_child_goes_too(user_a, workdir,
                                                                                 tree):
    """The program exits, its setsid children keep its stdout and stderr open: the exit is known
    at once (Python 3.11's wait() would wait for the pipes), and ending the rest kills them."""
    out = os.path.join(workdir, "rec.json")

    async def run():
        child = await start(user_a, [sys.executable, os.path.join(workdir, "spawner.py"), out,
                                     "3"], tree, stdout=subprocess.PIPE)
        rec = None
        try:
            assert await asyncio.wait_for(child.exited(), 15) == 3
            rec = read_record(out)
            assert rec is not None and any(alive(p) for p in rec["children"])
            await asyncio.wait_for(child.end_rest(), 5)
            for pid in rec["children"]:
                wait_until(lambda pid=pid: not alive(pid), timeout=5, what=f"pid {pid} to go")
            # Its pipes are closed now that nothing holds them: the readers see their end.
            assert await asyncio.wait_for(child.proc.stderr.read(), 5) == b""
            child.close_pipes()
            assert not os.path.exists(child.cgroup.path)
        finally:
            if rec:
                kill_all(rec["children"])

    asyncio.run(run())


def test_without_a_cgroup_its_process_group_is_killed(user_a, workdir):
    """The fallback (no delegated cgroup): a child that stayed in the program's process group
    goes with it. (One that left the group with setsid does not: the README says so.)"""
    marker = os.path.join(workdir, "grandchild")
    prog = ("import os, subprocess, sys; "
            "p = subprocess.Popen(['sleep', '1000']); "
            f"open({marker!r}, 'w').write(str(p.pid)); sys.exit(0)")

    async def run():
        child = await start(user_a, [sys.executable, "-c", prog], None)
        assert child.cgroup is None
        assert await asyncio.wait_for(child.exited(), 15) == 0
        pid = int(open(marker).read())
        try:
            await child.end_rest()
            wait_until(lambda: not alive(pid), timeout=5, what="the grandchild to go")
        finally:
            kill_all([pid])
            child.close_pipes()

    asyncio.run(run())


def test_the_xauthority_reader_runs_in_a_cgroup_and_what_it_starts_goes_with_it(user_a, workdir,
                                                                                  tree):
    """read_as_caller: a reader that leaves a setsid process behind (its output closed, so the read
    itself succeeds) gets it killed with its cgroup, which is removed."""
    pidfile = os.path.join(workdir, "left")
    reader = ("/bin/sh", "-c", f"setsid sleep 1000 </dev/null >/dev/null 2>&1 & echo $! > {pidfile};"
              " printf data", "reader")
    caller = Caller(sender=":1.5", uid=user_a.pw_uid, pid=1, gid=user_a.pw_gid, groups=())

    async def run():
        return await read_as_caller(caller, "/nonexistent", timeout=10.0, reader=reader,
                                    cgroups=tree)

    try:
        assert asyncio.run(run()) == b"data"
        pid = int(open(pidfile).read())
        wait_until(lambda: not alive(pid), timeout=5, what="the reader's leftover to go")
        assert os.listdir(tree.path) == [n for n in os.listdir(tree.path)
                                          if not n.startswith("reader-")]
    finally:
        if os.path.exists(pidfile):
            kill_all([int(open(pidfile).read())])


def test_a_start_that_fails_removes_its_cgroup(user_a, tree):
    async def run():
        with pytest.raises(OSError):
            await start(user_a, ["/nonexistent/program"], tree)

    asyncio.run(run())
    assert not [n for n in os.listdir(tree.path) if n.startswith("worker-")]


# ---- finding the service's own cgroup ---------------------------------------------------------

MOUNTINFO = """\
24 29 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 24 0:27 / /sys/fs/cgroup ro,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate
90 31 0:27 /system.slice/spice-streamd.service /sys/fs/cgroup/system.slice/spice-streamd.service \
rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate
"""


def test_locate_reads_the_v2_line_and_the_deepest_cgroup2_mount():
    own = "0::/system.slice/spice-streamd.service\n"
    assert cgroup.locate(own, MOUNTINFO) == (
        "/system.slice/spice-streamd.service", "/sys/fs/cgroup/system.slice/spice-streamd.service")
    hybrid = ("12:pids:/\n1:name=systemd:/x\n0::/a b/c\n")
    mi = "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
    assert cgroup.locate(hybrid, mi) == ("/a b/c", "/sys/fs/cgroup/unified/a b/c")
    assert cgroup.locate("1:name=systemd:/\n", MOUNTINFO) is None  # v1 only
    assert cgroup.locate(own, "24 29 0:22 / /sys rw - sysfs sysfs rw\n") is None  # no cgroup2
    assert cgroup.locate("0::/gone (deleted)\n", MOUNTINFO) is None


def test_the_root_cgroup_or_a_shared_one_is_not_taken_over():
    mi = "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
    tree, why = cgroup.discover("0::/\n", mi, os.getpid())
    assert tree is None and "root cgroup" in why
    with scratch_cgroup() as path:
        rel = relative(path)
        mount = path[: len(path) - len(rel)]
        mi = f"41 31 0:38 / {mount} rw,relatime - cgroup2 cgroup2 rw\n"
        # Another process lives there (a login session's scope, say): not ours to rearrange.
        other = subprocess.Popen(["sleep", "1000"], preexec_fn=lambda: open(
            os.path.join(path, "cgroup.procs"), "w").write("0"))
        try:
            tree, why = cgroup.discover(f"0::{rel}\n", mi, os.getpid())
            assert tree is None and "other processes" in why
        finally:
            other.kill()
            other.wait()


def test_a_service_in_a_cgroup_of_its_own_moves_into_its_leaf(workdir):
    """The service's own delegated cgroup, found from /proc/self: the service moves into
    `service` (controllers can then be enabled for its children) and workers go beside it."""
    program = ("import json; from spice_streamd import cgroup; "
               "t = cgroup.service_tree(); c = t.create('worker', cgroup.WORKER_LIMITS); "
               "print(json.dumps({'tree': t.path, 'worker': c.path, 'me': "
               "[l[3:].strip() for l in open('/proc/self/cgroup') if l.startswith('0::')][0]}))")
    with scratch_cgroup() as path:
        own = os.path.join(path, "spice-streamd.service")
        os.mkdir(own)
        p = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                           timeout=30, preexec_fn=lambda: open(
                               os.path.join(own, "cgroup.procs"), "w").write("0"))
        assert p.returncode == 0, p.stderr
        got = json.loads(p.stdout)
        assert got["tree"] == own
        assert got["me"] == relative(os.path.join(own, "service"))
        assert got["worker"] == os.path.join(own, "worker-1")


def test_measured_worker_needs_fit_its_limits():
    """The figures behind WORKER_LIMITS (cgroup.py): a 3840x2160 worker peaked at 124 MB RSS and
    one task; the limit leaves twice that, and 16 workers of the larger kind (a Wayland worker's
    threads: SCREENCAST_WORKER_LIMITS) fit the unit's MemoryMax=/TasksMax=."""
    assert cgroup.WORKER_LIMITS.memory >= 2 * 124 * 10**6
    assert cgroup.SCREENCAST_WORKER_LIMITS.memory >= 2 * 124 * 10**6
    unit = open(os.path.join(os.path.dirname(__file__), "..", "dbus",
                             "spice-streamd.service")).read()
    values = dict(line.split("=", 1) for line in unit.splitlines()
                  if line.startswith(("TasksMax=", "MemoryMax=")))
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    mem = values["MemoryMax"]
    memory_max = int(mem[:-1]) * units[mem[-1]] if mem[-1] in units else int(mem)
    for worker in (cgroup.WORKER_LIMITS, cgroup.SCREENCAST_WORKER_LIMITS):
        assert 16 * worker.memory + 32 * cgroup.READER_LIMITS.memory < memory_max
        # What is left is the service's own (its threads: one per child process on Python 3.11,
        # 48 at most, and asyncio's executor's): at least 128 tasks.
        assert 16 * worker.pids + 32 * cgroup.READER_LIMITS.pids + 128 <= int(values["TasksMax"])
