#!/usr/bin/env python3
"""systemd's side of socket activation and the file-descriptor store, for
the restart test where systemd itself cannot run (no systemd as PID 1):
exactly the environment a unit with Type=notify, a .socket and
FileDescriptorStoreMax= gives the server.

usage: fake_systemd.py PAGEWIRE WORKDIR MEMFILE

1. Binds the listening socket WORKDIR/fc.sock itself and starts
   `pagewire serve` with it as fd 3 (LISTEN_FDS=1, LISTEN_FDNAMES,
   LISTEN_PID = the server's pid) and NOTIFY_SOCKET.
2. Keeps every descriptor the server stores (FDSTORE=1, FDNAME=...),
   forgets what it removes (FDSTOREREMOVE=1), notes READY=1.
3. Starts a client touching memory, waits until its VM is stored,
   SIGKILLs the server mid-touch, and starts it again with everything kept,
   as fds 3.. with their names, in reverse order (as systemd may).
4. The client must finish with every byte right; prints its report's
   figures. Exit status 0 on success.
"""

import array
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

BIN, WORK, MEM = sys.argv[1], sys.argv[2], sys.argv[3]

store = []  # (name, fd), in the order stored
ready = threading.Event()
lock = threading.Lock()


def receive(sock):
    while True:
        fds = array.array("i")
        msg, anc, _flags, _addr = sock.recvmsg(65536, socket.CMSG_SPACE(253 * fds.itemsize))
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
        kv = dict(line.split("=", 1) for line in msg.decode().splitlines() if "=" in line)
        with lock:
            name = kv.get("FDNAME", "stored")
            if kv.get("FDSTORE") == "1":
                for fd in fds:
                    store.append((name, fd))
            else:
                for fd in fds:
                    os.close(fd)
            if kv.get("FDSTOREREMOVE") == "1":
                for n, fd in [x for x in store if x[0] == name]:
                    os.close(fd)
                store[:] = [x for x in store if x[0] != name]
        if kv.get("READY") == "1":
            ready.set()


def start(named, log):
    """Starts the server with `named` [(name, fd)] as fds 3.. ."""
    # Move each fd high first, so that placing them at 3.. overwrites none.
    high = []
    for i, (_, fd) in enumerate(named):
        os.dup2(fd, 200 + i, inheritable=True)
        high.append(200 + i)
    redirect = " ".join(f"{3 + i}<&{h}" for i, h in enumerate(high))
    env = dict(os.environ)
    env.update(
        NOTIFY_SOCKET=os.path.join(WORK, "notify"),
        LISTEN_FDS=str(len(named)),
        LISTEN_FDNAMES=":".join(n for n, _ in named),
        PAGEWIRE_LOG="info",
    )
    # LISTEN_PID must be the server's own pid: the shell's, which exec keeps.
    script = f'exec {redirect}; export LISTEN_PID=$$; exec "$0" "$@"'
    p = subprocess.Popen(
        ["bash", "-c", script, BIN, "serve", "--socket", os.path.join(WORK, "unused.sock"),
         "--mem-file", MEM, "--fixed-cluster", "--cluster-pages", "1"],
        pass_fds=high, env=env, stderr=log,
    )
    for h in high:
        os.close(h)
    return p


def main():
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(os.path.join(WORK, "notify"))
    threading.Thread(target=receive, args=(notify,), daemon=True).start()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(os.path.join(WORK, "fc.sock"))
    listener.listen(64)
    log = open(os.path.join(WORK, "serve.log"), "wb")
    first = start([("listen.default", listener.fileno())], log)
    if not ready.wait(20):
        sys.exit("the server never said READY=1")
    client = subprocess.Popen(
        [BIN, "fc-client", "--socket", os.path.join(WORK, "fc.sock"), "--mem-file", MEM,
         "--threads", "2", "--timeout-s", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    deadline = time.time() + 20
    while True:
        with lock:
            vm = [n for n, _ in store if n.startswith("vm.")]
        if len(vm) == 3:
            break
        if time.time() > deadline:
            sys.exit(f"the VM was never stored whole: {store}")
        time.sleep(0.01)
    time.sleep(0.3)
    ready.clear()
    first.send_signal(signal.SIGKILL)
    first.wait()
    with lock:
        # systemd hands the store back in an order of its own (newest
        # first, a message's descriptors in no set order): reversed here, so
        # that the server must tell a VM's three apart by what they are.
        kept = [("listen.default", listener.fileno())] + list(reversed(store))
    second = start(kept, log)
    if not ready.wait(20):
        sys.exit("the restarted server never said READY=1")
    out, err = client.communicate(timeout=120)
    second.send_signal(signal.SIGTERM)
    second.wait(10)
    log.close()
    text = open(os.path.join(WORK, "serve.log")).read()
    if client.returncode != 0:
        sys.exit(f"client failed ({client.returncode}): {err.decode()}\n{text}")
    r = json.loads(out)
    if r["mismatched_pages"] != 0 or r["pages_verified"] != r["pages_total"]:
        sys.exit(f"wrong bytes: {r}")
    if "VM served on" not in text:
        sys.exit(f"the restarted server did not serve the VM on:\n{text}")
    print(json.dumps({
        "names_kept": sorted({n for n, _ in kept}),
        "longest_stall_ms": r["waited_latency"]["max_us"] / 1000,
        "pages_verified": r["pages_verified"],
    }))


main()
