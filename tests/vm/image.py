"""The VM suite's guest images: Debian 12 (bookworm) and 13 (trixie) built with debootstrap, cached
outside the checkout.

    python3 -m tests.vm.image [--release bookworm|trixie] [--force]   build (or find) one, print its directory

An image lives in $SPICE_STREAMD_VM_CACHE (default /var/cache/spice-streamd-vm)/<key>/, where <key>
is a hash of the release and of the build inputs: this file, guest_setup.sh and the release's
package list (packages.txt, whose `RELEASE: package` lines belong to that release only). A
directory there holds rootfs.ext4, vmlinuz, initrd.img and manifest.json; it only ever appears whole:
the build runs in .build-<key>-<pid>/ next to it and is renamed into place at the end, so a killed
build leaves no half image (its leftovers are removed by the next build). Downloaded .debs are kept in
<cache>/debs/ (a download cache only: the image is still built from nothing, just without fetching
the same files again).

No loop mounts: debootstrap --variant=minbase into a directory, apt-get in a chroot (bind mounts of
/proc, /sys, /dev only while it runs, with a clean environment: env -i), then `mkfs.ext4 -d`. The
mirror is the one apt on this machine already uses (/etc/apt/sources.list.d/*.sources or
/etc/apt/sources.list): nothing else is downloaded.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# The Debian releases the suite boots, oldest first, with their Debian version number.
RELEASES = {"bookworm": 12, "trixie": 13}
DEFAULT_RELEASE = "bookworm"
HERE = Path(__file__).resolve().parent
INPUTS = [HERE / "image.py", HERE / "guest_setup.sh"]
CACHE_ROOT = Path(os.environ.get("SPICE_STREAMD_VM_CACHE", "/var/cache/spice-streamd-vm"))
IMAGE_SIZE = "4G"
# Enough for debootstrap itself; everything else comes from packages.txt through apt (which resolves
# alternatives such as polkitd's "default-logind | logind" that debootstrap does not).
BOOTSTRAP_INCLUDE = ["ca-certificates"]
CLEAN_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "DEBIAN_FRONTEND": "noninteractive",
}
KEEP_IMAGES = 2  # per release: the current one and the most recently used other one


def packages(release: str) -> list[str]:
    """packages.txt for one release: every plain line, and `RELEASE: package` lines of that release."""
    if release not in RELEASES:
        raise SystemExit(f"image: unknown release {release!r} (known: {', '.join(RELEASES)})")
    found = []
    for line in (HERE / "packages.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        only, sep, rest = line.partition(":")
        if sep:
            if only.strip() not in RELEASES:
                raise SystemExit(f"image: packages.txt names an unknown release: {line!r}")
            if only.strip() != release:
                continue
            line = rest
        found.extend(line.split())
    return found


@dataclass(frozen=True)
class Image:
    directory: Path
    key: str

    @property
    def rootfs(self) -> Path:
        return self.directory / "rootfs.ext4"

    @property
    def kernel(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.directory / "initrd.img"

    def manifest(self) -> dict:
        return json.loads((self.directory / "manifest.json").read_text())


def image_key(release: str) -> str:
    h = hashlib.sha256(f"release={release}\n".encode())
    for path in INPUTS:
        h.update(f"{path.name}\n".encode())
        h.update(path.read_bytes())
    h.update(("packages\n" + "\n".join(packages(release)) + "\n").encode())
    return h.hexdigest()[:16]


# -- the mirror apt already uses ----------------------------------------------------------------------

def _deb822_paragraphs(text: str) -> list[dict[str, str]]:
    paragraphs, current, last = [], {}, None
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        if not line.strip():
            if current:
                paragraphs.append(current)
            current, last = {}, None
            continue
        if line[0] in " \t" and last:
            current[last] += " " + line.strip()
            continue
        key, _, value = line.partition(":")
        last = key.strip().lower()
        current[last] = value.strip()
    if current:
        paragraphs.append(current)
    return paragraphs


def apt_sources() -> list[tuple[str, list[str]]]:
    """(URI, suites) of every `deb` source apt on this machine uses."""
    found: list[tuple[str, list[str]]] = []
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        for p in _deb822_paragraphs(Path(path).read_text()):
            if "deb" not in p.get("types", "").split() or p.get("enabled", "yes").lower() == "no":
                continue
            for uri in p.get("uris", "").split():
                found.append((uri.rstrip("/"), p.get("suites", "").split()))
    lists = ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]
    for path in lists:
        with contextlib.suppress(OSError):
            for line in Path(path).read_text().splitlines():
                line = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
                if len(line) >= 3 and line[0] == "deb":
                    found.append((line[1].rstrip("/"), [line[2]]))
    return found


def mirrors(release: str) -> tuple[str, str | None]:
    """(the Debian archive, its security archive or None), both taken from apt's configuration.
    A release this machine does not use comes from the same archives (they serve every release)."""
    sources = apt_sources()
    main = [u for u, suites in sources if release in suites]
    main = main or [u for u, suites in sources
                    if any(not s.endswith("-security") for s in suites) and "security" not in u]
    if not main:
        raise SystemExit("image: no Debian mirror in /etc/apt/sources.list(.d): cannot debootstrap")
    security = [u for u, suites in sources if f"{release}-security" in suites]
    security = security or [u for u, suites in sources if any(s.endswith("-security") for s in suites)]
    return main[0], (security[0] if security else None)


# -- building ---------------------------------------------------------------------------------------

def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()) + "/"
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            target = line.split()[1].encode().decode("unicode_escape")
            if target.startswith(prefix) or target == prefix[:-1]:
                out.append(target)
    return out


def _unmount_all(path: Path) -> None:
    for target in sorted(_mounts_under(path), key=len, reverse=True):
        if subprocess.run(["umount", target], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", target], capture_output=True)
    left = _mounts_under(path)
    if left:
        raise RuntimeError(f"image: could not unmount {left}")


def _remove_tree(path: Path) -> None:
    """rm -rf that never crosses into a (forgotten) bind mount of /proc, /sys or /dev."""
    if not path.exists():
        return
    _unmount_all(path)
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=True)


class Builder:
    def __init__(self, release: str, key: str, log: Callable[[str], None],
                 log_file: Path | None) -> None:
        self.release = release
        self.key = key
        self.say = log
        self.log_file = log_file
        self.debs = CACHE_ROOT / "debs"

    def run(self, argv: list[str], **kw) -> None:
        self._append(f"$ {' '.join(argv)}\n")
        with open(self.log_file, "ab") if self.log_file else contextlib.nullcontext() as out:
            # Its own process group: an interrupted build kills apt-get/dpkg in the chroot too,
            # before the bind mounts are taken down.
            proc = subprocess.Popen(argv, stdout=out or subprocess.DEVNULL,
                                    stderr=subprocess.STDOUT, env=CLEAN_ENV, start_new_session=True,
                                    **kw)
            try:
                proc.wait()
            except BaseException:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise
        res = proc
        if res.returncode != 0:
            tail = ""
            if self.log_file:
                tail = "\n".join(self.log_file.read_text(errors="replace").splitlines()[-25:])
            raise RuntimeError(f"image: {argv[0]} failed with {res.returncode} (log "
                               f"{self.log_file}):\n{tail}")

    def _append(self, text: str) -> None:
        if self.log_file:
            with open(self.log_file, "a") as f:
                f.write(text)

    def build(self, tmp: Path) -> None:
        rootfs = tmp / "rootfs"
        release = self.release
        mirror, security = mirrors(release)
        self.debs.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        self.say(f"debootstrap --variant=minbase {release} from {mirror}")
        self.run(["debootstrap", "--variant=minbase", f"--include={','.join(BOOTSTRAP_INCLUDE)}",
                  f"--cache-dir={self.debs}", release, str(rootfs), mirror])
        lines = [f"deb {mirror} {release} main", f"deb {mirror} {release}-updates main"]
        if security:
            lines.append(f"deb {security} {release}-security main")
        (rootfs / "etc/apt/sources.list").write_text("\n".join(lines) + "\n")
        (rootfs / "root/packages.txt").write_text("\n".join(packages(release)) + "\n")
        shutil.copy(HERE / "guest_setup.sh", rootfs / "root/guest_setup.sh")
        self.say(f"debootstrap done in {time.monotonic() - t0:.0f} s; installing packages in a chroot")
        t1 = time.monotonic()
        archives = rootfs / "var/cache/apt/archives"
        try:
            self.run(["mount", "-t", "proc", "proc", str(rootfs / "proc")])
            self.run(["mount", "-t", "sysfs", "sysfs", str(rootfs / "sys")])
            self.run(["mount", "--bind", "/dev", str(rootfs / "dev")])
            self.run(["mount", "--bind", "/dev/pts", str(rootfs / "dev/pts")])
            self.run(["mount", "--bind", str(self.debs), str(archives)])
            self.run(["env", "-i", *(f"{k}={v}" for k, v in CLEAN_ENV.items()),
                      "chroot", str(rootfs), "/bin/sh", "/root/guest_setup.sh"])
            installed = subprocess.run(
                ["chroot", str(rootfs), "dpkg-query", "-W", "-f", "${Package} ${Version}\n"],
                env=CLEAN_ENV, capture_output=True, text=True, check=True).stdout.splitlines()
        finally:
            _unmount_all(rootfs)
        # The download cache was mounted over the image's archive directory: nothing of it stays.
        for deb in archives.glob("*.deb"):
            deb.unlink()
        (rootfs / "root/guest_setup.sh").unlink()
        self.say(f"packages installed in {time.monotonic() - t1:.0f} s")

        kernels = sorted((rootfs / "boot").glob("vmlinuz-*"))
        initrds = sorted((rootfs / "boot").glob("initrd.img-*"))
        if len(kernels) != 1 or len(initrds) != 1:
            raise RuntimeError(f"image: expected one kernel and one initrd, got {kernels} {initrds}")
        shutil.copy(kernels[0], tmp / "vmlinuz")
        shutil.copy(initrds[0], tmp / "initrd.img")
        t2 = time.monotonic()
        self.run(["mkfs.ext4", "-q", "-F", "-L", "spicevm", "-E", "root_owner=0:0", "-d",
                  str(rootfs), str(tmp / "rootfs.ext4"), IMAGE_SIZE])
        used = int(subprocess.run(["du", "-sb", "--one-file-system", str(rootfs)],
                                  capture_output=True, text=True).stdout.split()[0])
        _remove_tree(rootfs)
        self.say(f"mkfs.ext4 -d done in {time.monotonic() - t2:.0f} s (rootfs {used / 1e9:.2f} GB)")
        manifest = {
            "key": self.key, "release": release, "mirror": mirror, "security": security,
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "build_seconds": round(time.monotonic() - t0), "rootfs_bytes": used,
            "kernel": kernels[0].name, "packages": installed,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


def _release_of(directory: Path) -> str:
    try:
        return json.loads((directory / "manifest.json").read_text()).get("release", "bookworm")
    except (OSError, ValueError):
        return ""


def _prune(release: str, keep: str) -> None:
    """This release's old images (other keys) beyond the KEEP_IMAGES most recently used ones, and
    dead builds. Another release's images are left alone: the suite boots each in turn."""
    for stale in CACHE_ROOT.glob(".build-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if not (pid.isdigit() and Path(f"/proc/{pid}").exists()):
            _remove_tree(stale)
    images = [d for d in CACHE_ROOT.iterdir()
              if d.is_dir() and not d.name.startswith(".") and d.name != "debs" and d.name != keep
              and _release_of(d) in (release, "")]
    images.sort(key=lambda d: d.stat().st_mtime, reverse=True)
    for old in images[KEEP_IMAGES - 1:]:
        _remove_tree(old)


def ensure_image(release: str = DEFAULT_RELEASE, log: Callable[[str], None] = print,
                 log_file: Path | None = None, force: bool = False) -> Image:
    """The cached image of `release` for the current inputs, built first if missing (or if force)."""
    if os.geteuid() != 0:
        raise SystemExit("image: building the VM image needs root (debootstrap, chroot)")
    for tool in ("debootstrap", "mkfs.ext4", "chroot"):
        if shutil.which(tool, path=CLEAN_ENV["PATH"]) is None:
            raise SystemExit(f"image: {tool} is not installed")
    key = image_key(release)
    final = CACHE_ROOT / key
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    log_file = log_file or CACHE_ROOT / f"build-{key}.log"
    with open(CACHE_ROOT / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if force and final.exists():
            _remove_tree(final)
        if (final / "manifest.json").exists():
            os.utime(final)
            log(f"image {key} ({release}): cached in {final}")
            return Image(final, key)
        _prune(release, keep=key)
        tmp = CACHE_ROOT / f".build-{key}-{os.getpid()}"
        _remove_tree(tmp)
        tmp.mkdir()
        log(f"image {key} ({release}): not cached, building it in {tmp} (log {log_file})")
        t0 = time.monotonic()
        try:
            Builder(release, key, log, log_file).build(tmp)
            os.rename(tmp, final)
        except BaseException:
            _remove_tree(tmp)
            raise
        log(f"image {key} ({release}): built in {time.monotonic() - t0:.0f} s -> {final}")
        return Image(final, key)


def _interrupt(*_) -> None:
    raise KeyboardInterrupt()


def main() -> int:
    # SIGTERM too must run the cleanup (unmount the chroot's binds, remove the partial build).
    signal.signal(signal.SIGTERM, _interrupt)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--release", choices=list(RELEASES), default=DEFAULT_RELEASE,
                        help=f"the Debian release (default {DEFAULT_RELEASE})")
    parser.add_argument("--force", action="store_true", help="rebuild even when cached")
    parser.add_argument("--log", type=Path, help="build log file")
    args = parser.parse_args()
    image = ensure_image(args.release, log=lambda s: print(f"==> {s}", flush=True),
                         log_file=args.log, force=args.force)
    print(image.directory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
