"""systemd-style socket activation launcher.

Usage: python socket_activate.py FD PROGRAM [ARGS...]

Moves the inherited listening socket FD to fd 3, sets LISTEN_PID to its own pid (which the
exec'd program keeps) and LISTEN_FDS=1, then execs PROGRAM.
"""
import os
import sys


def main() -> None:
    fd = int(sys.argv[1])
    argv = sys.argv[2:]
    if fd != 3:
        os.dup2(fd, 3)          # the duplicate is inheritable (no O_CLOEXEC)
        os.close(fd)
    else:
        os.set_inheritable(3, True)
    os.environ["LISTEN_PID"] = str(os.getpid())
    os.environ["LISTEN_FDS"] = "1"
    os.environ.pop("LISTEN_FDNAMES", None)
    os.execv(argv[0], argv)


if __name__ == "__main__":
    main()
