"""A real program for restore tests: an asyncio event loop answering lines from stdin.

The loop is what a restore of anonymous-inode fds must get right: an epoll fd watching stdin and
its self-pipe (a unix socketpair, which is also the signal wakeup fd), a signal handler that
wakes it through that socketpair, and timers.
usage: python3 asyncio_echo.py
Prints "ready PID"; "ping" -> "pong N" (after a short sleep on the loop's timer); "signal" ->
SIGUSR1 to itself, handled through the loop -> "signalled N"; "exit" -> exit status 0.
"""

import asyncio
import os
import signal
import sys


async def main() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    got = asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR1, got.set)
    pings = signals = 0
    print(f"ready {os.getpid()}", flush=True)
    while True:
        line = (await reader.readline()).strip()
        if not line or line == b"exit":
            return
        if line == b"signal":
            os.kill(os.getpid(), signal.SIGUSR1)
            await got.wait()
            got.clear()
            signals += 1
            print(f"signalled {signals}", flush=True)
        else:
            pings += 1
            await asyncio.sleep(0.001)
            print(f"pong {pings}", flush=True)


asyncio.run(main())
