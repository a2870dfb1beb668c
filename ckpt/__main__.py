from ckpt.client import run

run()
