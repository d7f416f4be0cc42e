"""The agent inside the test VM: PID 1 after the initramfs, runs the host's commands one at a time.

It is started by the initramfs's ``/init`` (scripts/build-vm-initramfs.sh) on the host's root, which
the guest sees read-only over virtiofs, with tmpfs on ``/run``, ``/tmp`` and ``/var/tmp``. Standard
library only: it runs under whatever Python the host's test run uses.

PID 1 stays a reaper (daemons a test orphans are re-parented to it and must be waited for); a
forked child serves the host on the virtio-serial port named ``calyx.agent``, one JSON object a
line each way:

- the agent says ``{"ready": true, ...}`` once, when it can take commands;
- the host sends ``{"argv": [...]}`` or ``{"sh": "..."}`` with ``env``, ``cwd``, ``modules`` (to
  ``modprobe`` first) and ``timeout``; the agent runs it in a session of its own, kills that session
  when the timeout passes, and answers ``{"marker": "CALYX-VM-EXIT", "rc": N | null, "output": ...}``
  (``rc`` null: the timeout killed it);
- ``{"shutdown": true}`` powers the guest off.

Each command's end is also written to the console as ``CALYX-VM-EXIT-CODE=<rc>``, so the console the
host keeps tells the story of a run that went wrong.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

PORT_NAME = "calyx.agent"
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/run/tmp",
    "TMPDIR": "/run/tmp",
    "LANG": "C.UTF-8",
    "PYTHONDONTWRITEBYTECODE": "1",
    "CALYX_IN_VM": "1",
}


def console(line: str) -> None:
    try:
        with open("/dev/console", "w") as c:
            c.write(line + "\n")
    except OSError:
        pass


def power_off() -> None:
    os.sync()
    try:
        Path("/proc/sys/kernel/sysrq").write_text("1")
        Path("/proc/sysrq-trigger").write_text("o")
    except OSError:
        pass
    time.sleep(30)
    os._exit(1)


def find_port() -> Path:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for d in Path("/sys/class/virtio-ports").glob("vport*"):
            try:
                if (d / "name").read_text().strip() == PORT_NAME:
                    return Path("/dev") / d.name
            except OSError:
                continue
        time.sleep(0.05)
    raise RuntimeError(f"no virtio-serial port named {PORT_NAME}")


def prepare() -> None:
    for d in ("/run/tmp", "/run/netns", "/run/lock"):
        os.makedirs(d, exist_ok=True)
    os.chmod("/run/tmp", 0o1777)
    try:
        Path("/proc/sys/kernel/hostname").write_text("calyx-vm")
    except OSError:
        pass
    subprocess.run(["ip", "link", "set", "lo", "up"], check=False)
    # the default (/sbin/modprobe) finds the host's /lib/modules/<this kernel>; make sure of it
    Path("/proc/sys/kernel/modprobe").write_text("/sbin/modprobe")


def run(req: dict[str, Any]) -> dict[str, Any]:
    t0 = time.monotonic()
    out: list[str] = []
    for mod in req.get("modules", []):
        r = subprocess.run(["modprobe", mod], capture_output=True, text=True, check=False)
        if r.returncode:
            out.append(f"modprobe {mod} failed: {r.stderr.strip()}\n")
    env = dict(BASE_ENV, **req.get("env", {}))
    argv = req["argv"] if "argv" in req else ["/bin/sh", "-c", req["sh"]]
    timeout = float(req.get("timeout", 300))
    timed_out = False
    try:
        proc = subprocess.Popen(argv, cwd=req.get("cwd") or "/", env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    except OSError as e:
        return {"marker": "CALYX-VM-EXIT", "rc": 127, "output": "".join(out) + f"cannot start {argv[0]}: {e}\n",
                "seconds": time.monotonic() - t0}
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        stdout, _ = proc.communicate()
    out.append(stdout.decode(errors="replace"))
    rc = None if timed_out else proc.returncode
    if timed_out:
        out.append(f"\n[agent: killed after the {timeout:.0f} s timeout]\n")
    return {"marker": "CALYX-VM-EXIT", "rc": rc, "output": "".join(out), "seconds": time.monotonic() - t0}


def serve() -> None:
    os.environ.update(BASE_ENV)
    prepare()
    port = find_port()
    with open(port, "r+b", buffering=0) as f, open(f.fileno(), "rb", closefd=False) as reader:
        hello = {"ready": True, "kernel": os.uname().release, "python": sys.version.split()[0]}
        f.write(json.dumps(hello).encode() + b"\n")
        console("CALYX-VM-READY")
        while True:
            line = reader.readline()
            if not line:
                time.sleep(0.05)  # the host is not connected (yet / any more)
                continue
            try:
                req = json.loads(line)
            except ValueError:
                f.write(json.dumps({"marker": "CALYX-VM-EXIT", "rc": 2, "output": f"bad request: {line!r}"}
                                   ).encode() + b"\n")
                continue
            if req.get("shutdown"):
                console("CALYX-VM-SHUTDOWN")
                return
            answer = run(req)
            console(f"CALYX-VM-EXIT-CODE={answer['rc']}")
            f.write(json.dumps(answer).encode() + b"\n")


def main() -> None:
    if os.getpid() != 1:
        serve()
        return
    child = os.fork()
    if child == 0:
        try:
            serve()
        except BaseException:
            console("CALYX-VM-AGENT-FAILED: " + traceback.format_exc())
            os._exit(1)
        os._exit(0)
    # PID 1: reap everything; when the agent ends, the machine ends
    while True:
        try:
            pid, _ = os.wait()
        except ChildProcessError:
            break
        if pid == child:
            break
    power_off()


if __name__ == "__main__":
    main()
