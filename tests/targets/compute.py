"""A real program for restore tests: a deterministic computation that writes its result at the end.

usage: python3 compute.py OUT STEPS
Prints "ready", then "step N" every 10 steps, then "done" once OUT is written.
"""

import hashlib
import sys
import time

out, steps = sys.argv[1], int(sys.argv[2])
h = hashlib.sha256(b"seed")
acc: list[str] = []
table: dict[int, int] = {}
print("ready", flush=True)
for i in range(steps):
    for _ in range(500):
        h = hashlib.sha256(h.digest())
    acc.append(h.hexdigest()[:16])
    table = {k: k * i + len(acc) for k in range(300)}
    if i % 10 == 0:
        print(f"step {i}", flush=True)
    time.sleep(0.01)
with open(out, "w") as f:
    f.write("\n".join(acc) + f"\n{sum(table.values())}\n")
print("done", flush=True)
