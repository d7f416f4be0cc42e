"""ExaBGP API process for bench_bgp.py: send a file of commands, one at a time, each after its ack.

Usage (as ExaBGP's ``run``): ``python bench/bgp_announcer.py <commands file> <result file>``. It
waits for the first ``"state": "up"`` event, then writes each command and waits for its ``done`` /
``error`` line before the next (ExaBGP's acks are not in order when commands are pipelined). The
result file gets ``start <t>`` and ``end <t> <errors>`` (``time.time()``). It keeps reading stdin
until ExaBGP closes it, so ExaBGP never blocks writing to it.
"""

from __future__ import annotations

import sys
import threading
import time


def main() -> int:
    commands = open(sys.argv[1]).read().splitlines()  # noqa: SIM115
    result = sys.argv[2]
    up = threading.Event()
    acks: list[str] = []
    ack_ready = threading.Condition()

    def reader() -> None:
        for line in sys.stdin:
            text = line.strip()
            if text in ("done", "error"):
                with ack_ready:
                    acks.append(text)
                    ack_ready.notify()
            elif '"state": "up"' in text:
                up.set()

    threading.Thread(target=reader, daemon=True).start()
    up.wait()
    errors = 0
    start = time.time()
    with open(result, "w") as out:
        out.write(f"start {start}\n")
        out.flush()
        for cmd in commands:
            sys.stdout.write(cmd + "\n")
            sys.stdout.flush()
            with ack_ready:
                while not acks:
                    ack_ready.wait()
                if acks.pop(0) == "error":
                    errors += 1
        out.write(f"end {time.time()} {errors}\n")
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
