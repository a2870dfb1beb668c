"""A real server for migration tests: a single-threaded selectors (epoll) loop that listens on
loopback, greets every client it accepts with its pid and echoes back every byte it gets.

usage: python3 tcpserver.py HOST [PORT]
Prints "ready PORT PID" once listening. Lines on stdin:
  "hold"   -> stops accepting (new clients wait in the listener's accept queue) -> "held"
  "accept" -> accepts again -> "accepting"
  "stats"  -> "stats PID ACCEPTED OPEN" (clients accepted so far, connections open now)
  "exit"   -> exit status 0
A client is sent b"hello PID\\n" when accepted, then its bytes back as they come, in order.
"""

import os
import selectors
import socket
import sys

host = sys.argv[1]
port = int(sys.argv[2]) if len(sys.argv) > 2 else 0
family = socket.AF_INET6 if ":" in host else socket.AF_INET
lst = socket.socket(family, socket.SOCK_STREAM)
lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
lst.bind((host, port))
lst.listen(16)
lst.setblocking(False)
sel = selectors.DefaultSelector()
sel.register(sys.stdin.fileno(), selectors.EVENT_READ, "stdin")
sel.register(lst, selectors.EVENT_READ, "listen")
out: dict[socket.socket, bytearray] = {}
accepted = 0
line = b""
print(f"ready {lst.getsockname()[1]} {os.getpid()}", flush=True)


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
                if cmd == b"hold":
                    sel.unregister(lst)
                    print("held", flush=True)
                elif cmd == b"accept":
                    sel.register(lst, selectors.EVENT_READ, "listen")
                    print("accepting", flush=True)
                elif cmd == b"stats":
                    print(f"stats {os.getpid()} {accepted} {len(out)}", flush=True)
                elif cmd == b"exit":
                    sys.exit(0)
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
