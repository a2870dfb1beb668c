from ckpt.cli import run

run()
