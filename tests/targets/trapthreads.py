"""python3 with three threads, ignoring SIGTRAP (tests/test_migrate_final.py): a restore must not
reset that action, in any thread's injections.

Prints "ready PID"; then for each line "step" on stdin the three workers each advance a series of
their own by one step (in lock step with the main thread: a barrier) and the main thread prints
"step N V1 V2 V3". Between steps every thread waits (the workers in the barrier's lock, the main
thread in read()). Two runs given the same lines print the same answers."""

import os
import signal
import sys
import threading

signal.signal(signal.SIGTRAP, signal.SIG_IGN)
values = [0, 0, 0]
barrier = threading.Barrier(4)


def work(i: int) -> None:
    x = i + 1
    while True:
        barrier.wait()
        for k in range(3000):
            x = (x * 31 + k + i) % 1_000_003
        values[i] = x
        barrier.wait()


for i in range(3):
    threading.Thread(target=work, args=(i,), daemon=True).start()
print(f"ready {os.getpid()}", flush=True)
n = 0
for line in sys.stdin:
    if line.strip() != "step":
        print("unknown", flush=True)
        continue
    barrier.wait()
    barrier.wait()
    n += 1
    print(f"step {n} {values[0]} {values[1]} {values[2]}", flush=True)
