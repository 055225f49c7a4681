"""Programs a hostile user runs as their worker (or Xauthority reader): source text the tests write
to a file and start under another uid."""

# Starts children that outlive it unless something ends them: two `setsid sleep` holding its
# stdout/stderr (another session, another process group), and a daemon (double fork, setsid) whose
# parent has exited. Leaves `pids` (theirs) and `cg` (its own cgroup v2 path) defined, for the
# program it is part of to report.
SPAWN_CHILDREN = r'''
pids = [subprocess.Popen(["setsid", "sleep", "1000"]).pid for _ in range(2)]
r, w = os.pipe()
if os.fork() == 0:
    os.setsid()
    pid = os.fork()
    if pid == 0:
        os.execvp("sleep", ["sleep", "1000"])
    os.write(w, str(pid).encode())
    os._exit(0)
os.close(w)
pids.append(int(os.read(r, 64)))
cg = [l[3:].strip() for l in open("/proc/self/cgroup") if l.startswith("0::")][0]
'''
