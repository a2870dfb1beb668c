"""A server of two processes for tree migration tests: the parent and a child it forked each listen
on a port of their own, greet every client they accept with their pid and echo back every byte.

usage: python3 tcptreeserver.py HOST
Prints "ready PORT CHILD_PORT PID CHILD_PID" once both listen. Lines on stdin (the parent's):
  "stats" -> "stats PID ACCEPTED OPEN" (the parent's clients accepted so far, connections open now)
The child does not read stdin; it dies with its parent (PR_SET_PDEATHSIG).
"""

import ctypes
import os
import selectors
import signal
import socket
import sys

PR_SET_PDEATHSIG = 1


def listener(host: str) -> socket.socket:
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, 0))
    s.listen(16)
    s.setblocking(False)
    return s


def serve(lst: socket.socket, commands: bool) -> None:
    sel = selectors.DefaultSelector()
    if commands:
        sel.register(sys.stdin.fileno(), selectors.EVENT_READ, "stdin")
    sel.register(lst, selectors.EVENT_READ, "listen")
    out: dict[socket.socket, bytearray] = {}
    accepted = 0
    line = b""

    def want(c: socket.socket) -> None:
        sel.modify(c, selectors.EVENT_READ | (selectors.EVENT_WRITE if out[c] else 0), "conn")

    def drop(c: socket.socket) -> None:
        sel.unregister(c)
        del out[c]
        c.close()

    while True:
        for key, events in sel.select():
            if key.data == "stdin":
                chunk = os.read(sys.stdin.fileno(), 4096)
                if not chunk:
                    sys.exit(0)
                line += chunk
                while b"\n" in line:
                    cmd, _, line = line.partition(b"\n")
                    if cmd == b"stats":
                        print(f"stats {os.getpid()} {accepted} {len(out)}", flush=True)
            elif key.data == "listen":
                try:
                    c, _ = lst.accept()
                except BlockingIOError:
                    continue
                accepted += 1
                c.setblocking(False)
                out[c] = bytearray(f"hello {os.getpid()}\n".encode())
                sel.register(c, selectors.EVENT_READ, "conn")
                want(c)
            else:
                c = key.fileobj  # type: ignore[assignment]
                assert isinstance(c, socket.socket)
                if events & selectors.EVENT_READ:
                    try:
                        got = c.recv(65536)
                    except (BlockingIOError, InterruptedError):
                        got = None
                    except OSError:
                        drop(c)
                        continue
                    if got == b"":
                        drop(c)
                        continue
                    if got:
                        out[c] += got
                if out[c]:
                    try:
                        n = c.send(out[c])
                    except (BlockingIOError, InterruptedError):
                        n = 0
                    except OSError:
                        drop(c)
                        continue
                    del out[c][:n]
                want(c)


host = sys.argv[1]
mine, theirs = listener(host), listener(host)
r, w = os.pipe()
child = os.fork()
if child == 0:
    os.close(r)
    mine.close()
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:
        os._exit(1)
    os.close(w)  # the parent's readiness: the child's death signal is set
    serve(theirs, commands=False)
os.close(w)
os.read(r, 1)  # EOF once the child is set up
os.close(r)
port = theirs.getsockname()[1]
theirs.close()
print(f"ready {mine.getsockname()[1]} {port} {os.getpid()} {child}", flush=True)
serve(mine, commands=True)
