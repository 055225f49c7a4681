"""Child process that reads a user's Xauthority file with that user's identity and copies it to stdout."""

from __future__ import annotations

import os
import stat
import sys

from spice_stream_common.xauthority import MAX_XAUTHORITY_BYTES

# Exit codes the parent maps to a refusal text (the text itself goes to stderr, one line).
EXIT_OK = 0
EXIT_USAGE = 2
EXIT_REFUSED = 3


def read_regular_file(path: str, limit: int = MAX_XAUTHORITY_BYTES) -> bytes:
    """The file's bytes; raises ValueError (a reason a person can act on) for anything but a small
    regular file. O_NOFOLLOW refuses a symlink; O_NONBLOCK keeps a FIFO from blocking the open."""
    if not os.path.isabs(path):
        raise ValueError("is not an absolute path")
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise ValueError("does not exist") from None
    except PermissionError:
        raise ValueError(f"is not readable by uid {os.getuid()}") from None
    except OSError as e:
        if e.errno == 40:  # ELOOP: the last component is a symlink
            raise ValueError("is a symbolic link") from None
        raise ValueError(f"cannot be opened: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("is not a regular file")
        if st.st_size > limit:
            raise ValueError(f"is larger than {limit} bytes")
        chunks = []
        total = 0
        while True:
            chunk = os.read(fd, limit + 1 - total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise ValueError(f"is larger than {limit} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: python -m spice_streamd.readfile ABSOLUTE_PATH\n")
        return EXIT_USAGE
    try:
        data = read_regular_file(args[0])
    except ValueError as e:
        sys.stderr.write(f"{e}\n")
        return EXIT_REFUSED
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
