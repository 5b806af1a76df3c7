"""How fast a batch crosses from the fetch process to the worker while the worker is busy.

The worker stores batch n (Python work, holding the GIL much of the time) while a thread of
it receives batch n+1 from the fetch process (mailsync/sync/fetcher.py). Over a pipe,
``pickle.load`` read a ~7 MB batch 64 KB at a time, and the receiving thread had to win the
GIL back after every piece; over the Unix socket of ``fetcher.Frames`` a whole frame is one
``recv_into(MSG_WAITALL)``. This sends N frames of 150 x 50 KB (a bench batch) both ways, in
one run, with a second thread spinning in Python as the storing does, and prints the
seconds and the ratio. No database, no mail server; a few seconds.

    .venv/bin/python bench/fetch_channel.py [--frames 10]
"""
from __future__ import annotations

import argparse
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BATCH = [os.urandom(50_000) for _ in range(150)]  # ~7.5 MB, incompressible as attachments are


def child(kind: str, frames: int) -> None:
    from mailsync.sync.fetcher import write_frame

    out = os.fdopen(1, "wb")
    for _ in range(frames):
        if kind == "pipe":
            pickle.dump(("batch", BATCH), out, protocol=pickle.HIGHEST_PROTOCOL)
            out.flush()
        else:
            write_frame(out, ("batch", BATCH))
    if kind == "pipe":
        pickle.dump(("done",), out)
        out.flush()
    else:
        write_frame(out, ("done",))


def receive(kind: str, frames: int, busy: bool) -> float:
    from mailsync.sync.fetcher import Frames, bound_silence

    command = [sys.executable, __file__, "--child", kind, "--frames", str(frames)]
    if kind == "pipe":
        proc = subprocess.Popen(command, stdout=subprocess.PIPE)
        load = lambda: pickle.load(proc.stdout)  # noqa: E731, S301
    else:
        ours, theirs = socket.socketpair()
        bound_silence(ours)  # as the worker's end is (SO_RCVTIMEO)
        proc = subprocess.Popen(command, stdout=theirs.fileno())
        theirs.close()
        load = Frames(ours).load
    stop = threading.Event()

    def spin() -> None:  # the worker's storing: Python holding the GIL
        x = 0
        while not stop.is_set():
            x += 1

    spinner = threading.Thread(target=spin)
    if busy:
        spinner.start()
    start = time.perf_counter()
    while load()[0] != "done":
        pass
    seconds = time.perf_counter() - start
    stop.set()
    if busy:
        spinner.join()
    proc.wait()
    return seconds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=10)
    p.add_argument("--child")
    args = p.parse_args()
    if args.child:
        child(args.child, args.frames)
        return 0
    mb = args.frames * sum(map(len, BATCH)) / 1e6
    print(f"{args.frames} frames, {mb:.0f} MB; median of 3 each")
    for busy in (False, True):
        pipe = sorted(receive("pipe", args.frames, busy) for _ in range(3))[1]
        sock = sorted(receive("socket", args.frames, busy) for _ in range(3))[1]
        what = "receiver's process busy in Python" if busy else "receiver's process idle"
        print(f"  {what:36s} pipe + pickle.load {pipe:5.2f} s   socket frames {sock:5.2f} s   "
              f"{pipe / sock:4.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
