"""A real multi-threaded program for restore tests: python threads computing, waiting and sleeping.

usage: python3 pythreads.py WORKERS STEPS
WORKERS threads each compute a chain of STEPS sha256 (thread k starts from b"seed-k"). Beside them,
a thread blocked in queue.get() answers "echo" commands, and one sleeps in time.sleep (an absolute
clock_nanosleep) for an hour. The main thread reads commands from stdin:
  progress -> "progress N1 N2 ..."     steps done by each worker so far
  result   -> "result H1 H2 ..."       once every worker is done: each chain's last digest (hex)
  echo X   -> "echo X"                 through the queue thread (a round trip through two queues)
  threads  -> "threads N"              threads alive (threading.active_count())
  exit     -> exits 0
"""

import hashlib
import queue
import sys
import threading
import time

workers, steps = int(sys.argv[1]), int(sys.argv[2])
done = [0] * workers
digests = [""] * workers
finished = threading.Event()
lock = threading.Lock()
count = [0]
requests: "queue.Queue[str]" = queue.Queue()
replies: "queue.Queue[str]" = queue.Queue()


def compute(k: int) -> None:
    h = hashlib.sha256(f"seed-{k}".encode()).digest()
    for i in range(steps):
        h = hashlib.sha256(h).digest()
        done[k] = i + 1
    digests[k] = h.hex()
    with lock:
        count[0] += 1
        if count[0] == workers:
            finished.set()


def echo() -> None:
    while True:
        replies.put(requests.get())


pool = [threading.Thread(target=compute, args=(k,), name=f"compute-{k}", daemon=True) for k in range(workers)]
threading.Thread(target=echo, name="echo", daemon=True).start()
threading.Thread(target=time.sleep, args=(3600,), name="sleeper", daemon=True).start()
for t in pool:
    t.start()
print("ready", flush=True)
for line in sys.stdin:
    cmd, _, arg = line.strip().partition(" ")
    if cmd == "progress":
        print("progress", *done, flush=True)
    elif cmd == "result":
        finished.wait()
        print("result", *digests, flush=True)
    elif cmd == "echo":
        requests.put(arg)
        print("echo", replies.get(), flush=True)
    elif cmd == "threads":
        print("threads", threading.active_count(), flush=True)
    elif cmd == "exit":
        sys.exit(0)
