""".ci/dev and the VM suite's logs, run as root against directories another uid planted first.

Each run happens in a private mount namespace whose /var/tmp (1777, as the real one), /var/cache and
/var/log (0755, root's) are fresh tmpfs: the planting is done there by the real uid spice-test-a,
then the real .ci/dev (from a checkout other users cannot read, so it copies itself) or the real
tests.vm.run starts as root. A planted program writes a marker file when it runs: it must stay absent.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.bus import ensure_test_user

REPO = Path(__file__).resolve().parents[1]
ATTACKER = "spice-test-a"
OLD_COPY = "/var/tmp/spice-streamd-src"  # the fixed name .ci/dev used to copy the checkout to
NEW_COPY = "/var/cache/spice-streamd-src"
OLD_LOGS = "/var/tmp/spice-streamd-vm-logs"  # the VM suite's old log root
NEW_LOGS = "/var/log/spice-streamd-vm"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("setpriv") is None,
    reason="needs root, unshare(1) and setpriv(1)")

PRIVATE_VAR = ("mount -t tmpfs -o mode=1777 tmpfs /var/tmp && "
               "mount -t tmpfs -o mode=0755 tmpfs /var/cache && "
               "mount -t tmpfs -o mode=0755 tmpfs /var/log")


def _keep_repo() -> str:
    """sh that keeps this checkout (and its virtualenv) where it is across PRIVATE_VAR: run from
    .ci/dev's copy in /var/cache (a private clone, as in CI), the fresh tmpfs would hide it."""
    if not any(REPO.is_relative_to(d) for d in ("/var/tmp", "/var/cache", "/var/log")):
        return PRIVATE_VAR
    repo = shlex.quote(str(REPO))
    return (f'keep=$(mktemp -d) && mount --bind {repo} "$keep" && {PRIVATE_VAR} && '
            f'mkdir -p {repo} && mount --bind "$keep" {repo}')


def in_namespace(script: str, env: dict[str, str] | None = None, timeout: float = 120, *,
                 keep_repo: bool = False) -> subprocess.CompletedProcess[str]:
    """`script` (sh) as root in a private mount namespace with fresh /var/tmp, /var/cache, /var/log
    (keep_repo: this checkout kept reachable where it is, for a script that runs its code)."""
    private = _keep_repo() if keep_repo else PRIVATE_VAR
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                           f"set -e; {private}; {script}"],
                          capture_output=True, text=True, timeout=timeout, check=False,
                          env=env if env is not None else dict(os.environ))


def as_attacker(script: str) -> str:
    """sh that runs `script` as spice-test-a (its own uid, gid, no groups)."""
    pw = ensure_test_user(ATTACKER)
    return (f"setpriv --reuid={pw.pw_uid} --regid={pw.pw_gid} --clear-groups "
            f"sh -c {shlex.quote('set -e; umask 022; ' + script)}")


def fake_venv(copy: str, marker: Path, stamp: str) -> str:
    """sh that makes COPY/.venv hold a python that writes `marker` and the stamp .ci/dev trusts."""
    program = f"#!/bin/sh\necho \"uid $(id -u) ran $0 $*\" >> {marker}\n"
    return (f"mkdir -p {copy}/.venv/bin && "
            f"printf %s {shlex.quote(program)} > {copy}/.venv/bin/python && "
            f"chmod 755 {copy}/.venv/bin/python && "
            f"echo {stamp} > {copy}/.venv/.spice-streamd-installed")


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A checkout other users cannot read (pytest's tmp_path is 0700 root): .ci/dev copies it."""
    dest = tmp_path / "checkout"
    shutil.copytree(REPO, dest, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "dist", "build", "*.egg-info", "__pycache__", ".pytest_cache",
        ".ruff_cache", ".hypothesis"))
    p = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "test",
                        "-r", str(dest / "pyproject.toml")], check=False)
    assert p.returncode != 0, "the checkout must be unreadable by other users for this test"
    return dest


def stamp_of(checkout: Path) -> str:
    return hashlib.sha256((checkout / "pyproject.toml").read_bytes()).hexdigest()


def run_ci_dev(checkout: Path, setup: str, env: dict[str, str] | None = None
               ) -> subprocess.CompletedProcess[str]:
    """The setup (sh, as root, may plant as the attacker), then `.ci/dev unit-test --version`."""
    full = dict(os.environ)
    full.pop("SPICE_STREAMD_CI_COPY", None)
    full.update(env or {})
    return in_namespace(f"{setup}\nexec {shlex.quote(str(checkout / '.ci/dev'))} unit-test --version",
                        env=full)


def test_copy_planted_at_the_old_fixed_name_never_runs(checkout: Path, tmp_path: Path) -> None:
    """The reported attack: spice-test-a makes /var/tmp/spice-streamd-src with a venv of its own and
    the right stamp before root's next .ci/dev run. The copy must go where only root can create it,
    and run the virtualenv root made there."""
    marker, legit = tmp_path / "planted-ran", tmp_path / "legit-ran"
    stamp = stamp_of(checkout)
    setup = "\n".join([
        as_attacker(f"mkdir {OLD_COPY} && " + fake_venv(OLD_COPY, marker, stamp)),
        # root's own copy from an earlier run, its virtualenv kept (stands in for pip's).
        f"mkdir -m 755 {NEW_COPY}", fake_venv(NEW_COPY, legit, stamp),
    ])
    p = run_ci_dev(checkout, setup)
    assert not marker.exists(), "the planted program ran as root:\n" + marker.read_text()
    assert p.returncode == 0, p.stdout + p.stderr
    assert legit.read_text().split()[:2] == ["uid", "0"]
    assert f"running from a copy in {NEW_COPY}" in p.stdout


@pytest.mark.parametrize("plant", ["copy dir owned by the user", "copy dir others can write",
                                   "venv owned by the user", "venv/bin owned by the user",
                                   "copy dir is a symlink"])
def test_unsafe_copy_is_refused_and_nothing_in_it_runs(checkout: Path, tmp_path: Path,
                                                       plant: str) -> None:
    """Wherever the copy goes (SPICE_STREAMD_CI_COPY, or the default), .ci/dev refuses a directory
    it or a component of which root does not alone control, with one line, before running anything
    in it. The same program is planted at the old fixed name too."""
    marker = tmp_path / "planted-ran"
    stamp = stamp_of(checkout)
    attacker_dir = "/var/tmp/a-copy"
    steps = [as_attacker(f"mkdir {OLD_COPY} && " + fake_venv(OLD_COPY, marker, stamp))]
    env = {}
    if plant == "copy dir owned by the user":
        target = "/var/tmp/a-copy"  # a place the user picked: refused at /var/tmp (1777) already
        steps.append(as_attacker(f"mkdir {target} && " + fake_venv(target, marker, stamp)))
        env["SPICE_STREAMD_CI_COPY"] = target
    elif plant == "copy dir others can write":
        target = NEW_COPY
        steps += [f"mkdir -m 777 {target}", as_attacker(fake_venv(target, marker, stamp))]
    elif plant == "venv owned by the user":
        target = NEW_COPY
        pw = ensure_test_user(ATTACKER)
        steps += [f"mkdir -m 755 {target} {target}/.venv",
                  f"chown {pw.pw_uid}:{pw.pw_gid} {target}/.venv",
                  as_attacker(fake_venv(target, marker, stamp))]
    elif plant == "venv/bin owned by the user":
        target = NEW_COPY
        pw = ensure_test_user(ATTACKER)
        steps += [f"mkdir -m 755 {target} {target}/.venv {target}/.venv/bin",
                  f"echo {stamp} > {target}/.venv/.spice-streamd-installed",
                  f"chown {pw.pw_uid}:{pw.pw_gid} {target}/.venv/bin",
                  as_attacker(f"printf '#!/bin/sh\\necho ran >> {marker}\\n' > {target}/.venv/bin/python"
                              f" && chmod 755 {target}/.venv/bin/python")]
    else:
        target = NEW_COPY
        steps += [as_attacker(f"mkdir {attacker_dir} && " + fake_venv(attacker_dir, marker, stamp)),
                  f"ln -s {attacker_dir} {target}"]
    p = run_ci_dev(checkout, "\n".join(steps), env)
    assert not marker.exists(), "the planted program ran as root:\n" + marker.read_text()
    assert p.returncode == 2, p.stdout + p.stderr
    errors = p.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith(
        f"spice-streamd .ci/dev: refusing to run from {target} ("), p.stderr


def test_safedir_checks_every_component(tmp_path: Path) -> None:
    """The helper itself: a root-owned tree passes; another owner, group/other write, a symlink or
    a file at any component is refused; a fresh directory is never an existing one; a shared (1777)
    directory is made on its descriptor, never through a planted symlink."""
    code = f"""
import os, sys
sys.path.insert(0, {str(REPO)!r})
from tests.support import safedir
def refused(f, *a, **k):
    try:
        r = f(*a, **k)
    except safedir.UnsafeDir as e:
        return str(e)
    raise AssertionError(f"accepted {{a}}: {{r}}")
os.umask(0o077)
os.close(safedir.ensure_dir("/var/cache/new/deep"))
safedir.check_dir("/var/cache/new/deep")
assert os.stat("/var/cache/new").st_mode & 0o7777 == 0o755
assert os.stat("/var/cache/new/deep").st_mode & 0o7777 == 0o755
print(refused(safedir.check_dir, "/var/tmp"))
print(refused(safedir.check_dir, "/var/tmp/a"))
print(refused(safedir.check_dir, "/var/cache/a"))
print(refused(safedir.check_dir, "/var/cache/link/y"))
print(refused(safedir.check_dir, "/var/cache/file"))
print(refused(safedir.ensure_dir, "/var/cache/group"))
print(refused(safedir.check_dir, "relative"))
fd = safedir.open_checked("/var/cache/x")
os.mkdir("/var/cache/x/y")
print(refused(safedir.make_dir, fd, "y", 0o755, fresh=True, shown="/var/cache/x/y"))
print(refused(safedir.make_dir, fd, "shared-link", 0o1777, fresh=False, shown="s"))
os.close(safedir.make_dir(fd, "shared", 0o1777, fresh=True, shown="s"))
assert os.stat("/var/cache/x/shared").st_mode & 0o7777 == 0o1777
print(oct(os.stat("/var/tmp/a").st_mode & 0o7777))
first = safedir.fresh_dir("/var/cache/x", "run")
second = safedir.fresh_dir("/var/cache/x", "run")
print(first, second)
"""
    pw = ensure_test_user(ATTACKER)
    setup = "\n".join([
        as_attacker("mkdir -m 755 /var/tmp/a"),
        "mkdir -m 755 /var/cache/a /var/cache/group", f"chown {pw.pw_uid} /var/cache/a",
        "chmod 775 /var/cache/group",
        "ln -s /var/cache/x /var/cache/link", "touch /var/cache/file",
        "mkdir -p -m 755 /var/cache/x", "ln -s /var/tmp/a /var/cache/x/shared-link",
    ])
    p = in_namespace(f"{setup}\nexec {shlex.quote(sys.executable)} -I -c {shlex.quote(code)}",
                     keep_repo=True)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    assert lines[:-2] == [
        "/var/tmp is writable by group or others (mode 1777)",
        "/var/tmp is writable by group or others (mode 1777)",
        f"/var/cache/a is owned by uid {pw.pw_uid}, not root",
        "/var/cache/link is a symbolic link",
        "/var/cache/file is not a directory",
        "/var/cache/group is writable by group or others (mode 0775)",
        "relative: expected an absolute path without '.' or '..'",
        "/var/cache/x/y exists already (expected a new directory)",
        "s is a symbolic link",
    ]
    assert lines[-2] == "0o755", "the symlink's target was changed"
    assert lines[-1] == "/var/cache/x/run /var/cache/x/run-2"


def run_vm_suite(setup: str, *args: str, env: dict[str, str] | None = None
                 ) -> subprocess.CompletedProcess[str]:
    """tests.vm.run as root after `setup`, with a .deb that does not exist: the suite stops at its
    first step, after it has made its log directories."""
    full = dict(os.environ)
    full.pop("SPICE_STREAMD_VM_LOGS", None)
    full.update(env or {})
    cmd = shlex.join([sys.executable, "-m", "tests.vm.run", "--deb", "/nonexistent.deb", *args])
    check = ("; rc=$?; echo \"== rc $rc\"; find /var/tmp/a-logs -printf '%p %m\\n' | sort; "
             f"echo ==; find {NEW_LOGS} -mindepth 1 -maxdepth 2 -printf '%P %u %m %y\\n' 2>/dev/null"
             " | sort")
    return in_namespace(f"{setup}\ncd {shlex.quote(str(REPO))}; set +e; {cmd}{check}", env=full,
                        timeout=300, keep_repo=True)


def vm_result(p: subprocess.CompletedProcess[str]) -> tuple[int, list[str], list[str]]:
    head, _, rest = p.stdout.partition("== rc ")
    rc, _, rest = rest.partition("\n")
    planted, _, ours = rest.partition("==\n")
    return int(rc), planted.split("\n")[:-1], ours.split("\n")[:-1]


PLANT_LOG_LINK = as_attacker(f"mkdir -m 755 /var/tmp/a-logs && ln -s /var/tmp/a-logs {OLD_LOGS}")


def test_vm_logs_go_to_a_root_only_place_not_through_a_planted_link() -> None:
    """The VM suite's default log root was a fixed name in /var/tmp: spice-test-a's symlink there
    made root create its run directory, and chmod 1777 a results directory, in the user's tree. It
    now lives where only root can create it; each release's results/ (1777) is made inside a new
    root-owned directory once that release runs (here none does: the .deb is missing)."""
    p = run_vm_suite(PLANT_LOG_LINK)
    rc, planted, ours = vm_result(p)
    assert planted == ["/var/tmp/a-logs 755"], f"root wrote into the planted target: {planted}"
    assert rc == 1, p.stdout + p.stderr  # the missing .deb: the suite got past its log directory
    (run,) = [line.split()[0] for line in ours if "/" not in line.split()[0]]
    assert sorted(ours) == sorted([f"{run} root 755 d", f"{run}/run.log root 644 f",
                                   f"{run}/share root 755 d"])


@pytest.mark.parametrize("how", ["SPICE_STREAMD_VM_LOGS", "--logdir"])
def test_vm_log_dir_through_a_planted_link_is_refused(how: str) -> None:
    """A log root (or --logdir) that is a user's symlink, or under a world-writable directory:
    refused with one line, nothing made or chmod-ed behind it."""
    if how == "--logdir":
        p = run_vm_suite(PLANT_LOG_LINK, "--logdir", f"{OLD_LOGS}/run1")
        shown = f"{OLD_LOGS}/run1"
    else:
        p = run_vm_suite(PLANT_LOG_LINK, env={"SPICE_STREAMD_VM_LOGS": OLD_LOGS})
        shown = OLD_LOGS
    rc, planted, ours = vm_result(p)
    assert planted == ["/var/tmp/a-logs 755"], f"root wrote into the planted target: {planted}"
    assert rc == 2, p.stdout + p.stderr
    assert p.stderr.strip().splitlines() == [
        f"vm-test: refusing the log directory {shown}: /var/tmp is writable by group or others "
        "(mode 1777)"], p.stderr
    assert ours == []
