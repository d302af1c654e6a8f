"""Benchmark: how long until a booted guest's agent and SSH answer, and what osbuilder adds.

In one run, interleaved round by round so machine noise hits every variant alike:
  - plain:     the image booted by a hand-written `qemu-system-x86_64` command line with the Debian
               kernel + initrd, the agent's socket polled with the agent client, SSH with paramiko;
  - osbuilder: the same image and kernel through osbuilder.vm (overlay, QMP, console watching);
  - built:     osbuilder.vm with the project's own kernel (WORKDIR/vmlinuz.container, no initrd),
               when it exists.
Times are wall seconds from the launch call to the agent's first `ping` answer and to an SSH login.
Prints medians and osbuilder's overhead over the plain command (promise: < 0.5 s), and the built
kernel's agent-ready time relative to Debian's (expected clearly faster).

Usage (as root, after `osbuilder rootfs && osbuilder image`, optionally `osbuilder kernel`):
    python3 bench/bench_boot.py [--rounds 3] [--workdir ./workdir]
Accelerator: ACCEL (default auto: KVM only where its probe passes, else TCG).
"""

from __future__ import annotations

import argparse
import dataclasses
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from osbuilder import settings as S
from osbuilder.agent import PORT_NAME
from osbuilder.agent.client import AgentClient
from osbuilder.layout import Workdir
from osbuilder.vm import accel as accel_mod
from osbuilder.vm import check, phases, ssh
from osbuilder.vm.debian_kernel import debian_kernel
from osbuilder.vm.guest import Guest
from osbuilder.vm.options import BootKernel
from osbuilder.vm.profiles import SYSTEMD
from osbuilder.vm.qemu import kernel_cmdline


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def plain_boot(image: Path, kernel: BootKernel, accel: str, key: ssh.SessionKey, tmp: Path) -> tuple[float, float]:
    """The hand-written QEMU command line a user would type; returns (agent_ready, ssh_ready)."""
    sock, port = tmp / "agent.sock", free_port()
    cmd = ["qemu-system-x86_64", "-machine", "q35", "-accel", accel, "-m", "1024", "-smp", "1",
           "-display", "none", "-no-reboot", "-serial", f"file:{tmp / 'console.log'}",
           "-kernel", str(kernel.kernel), *(["-initrd", str(kernel.initrd)] if kernel.initrd else []),
           "-append", kernel_cmdline(SYSTEMD.attach.root_params, "osbuilder.net=slirp"),
           "-drive", f"file={image},if=none,id=d0,format=raw,snapshot=on", "-device", "virtio-blk-pci,drive=d0",
           "-device", "virtio-serial-pci", "-chardev", f"socket,id=agent,path={sock},server=on,wait=off",
           "-device", f"virtserialport,chardev=agent,name={PORT_NAME}",
           "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:22", "-device", "virtio-net-pci,netdev=n0",
           "-smbios", f"type=11,value=io.systemd.credential:{ssh.CREDENTIAL}={key.public}"]
    if accel == "kvm":
        cmd += ["-cpu", "host,-arch-capabilities,-kvmclock"]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = AgentClient.connect_unix(str(sock), timeout=30)
        client.wait_ready(300)
        agent_ready = time.monotonic() - started
        ssh.connect(port, key, timeout=300).close()
        return agent_ready, time.monotonic() - started
    finally:
        proc.kill()
        proc.wait()


def osbuilder_boot(settings: S.Settings, image: Path, kernel: BootKernel, accel: accel_mod.Accel,
                   key: ssh.SessionKey, tmp: Path) -> tuple[float, float]:
    """The same boot through osbuilder.vm; returns (agent_ready, ssh_ready) from the launch call."""
    opts = check.guest_options(settings, image=image, kernel=kernel, accel=accel, name="bench", ssh_key=key)
    opts = dataclasses.replace(opts, log_dir=tmp / "logs")
    started = time.monotonic()
    with Guest.start(opts) as guest:
        for phase in ("kernel", "root", "init", "agent"):
            phases.run(guest, phase)
        agent_ready = time.monotonic() - started
        phases.ssh(guest)  # straight after the agent, like the plain run (the check proper waits for systemd first)
        ssh_ready = time.monotonic() - started
        guest.close(graceful=0)
    return agent_ready, ssh_ready


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", default="workdir")
    args = parser.parse_args()
    settings = S.load({"WORKDIR": str(Path(args.workdir).absolute())})
    image = Workdir.of(settings).image
    debian = debian_kernel(settings)
    built_path = Workdir.of(settings).kernel.vmlinuz
    built = BootKernel(built_path.absolute(), None, "built") if built_path.is_file() else None
    accel = accel_mod.choose(settings)
    print(f"image {image} ({image.stat().st_size >> 20} MiB); accelerator {accel.name} ({accel.reason})")
    results: dict[str, list[tuple[float, float]]] = {"plain": [], "osbuilder": [], "built": []}
    with tempfile.TemporaryDirectory(prefix="osb-bench-") as tmpdir:
        key = ssh.make_session_key(Path(tmpdir) / "key")
        for r in range(args.rounds):
            for name in ("plain", "osbuilder", "built"):
                if name == "built" and built is None:
                    continue
                tmp = Path(tempfile.mkdtemp(dir=tmpdir, prefix=f"{name}-{r}-"))
                if name == "plain":
                    times = plain_boot(image, debian, accel.name, key, tmp)
                else:
                    times = osbuilder_boot(settings, image, debian if name == "osbuilder" else built, accel, key,
                                           tmp)
                results[name].append(times)
                print(f"round {r + 1} {name:>9}: agent ready {times[0]:6.2f} s, ssh ready {times[1]:6.2f} s",
                      flush=True)
    med = {k: (statistics.median(a for a, _ in v), statistics.median(s for _, s in v)) for k, v in results.items() if v}
    for name, (agent, sshr) in med.items():
        print(f"median {name:>9}: agent ready {agent:6.2f} s, ssh ready {sshr:6.2f} s")
    over_agent = med["osbuilder"][0] - med["plain"][0]
    over_ssh = med["osbuilder"][1] - med["plain"][1]
    print(f"osbuilder overhead vs plain qemu: agent {over_agent:+.2f} s, ssh {over_ssh:+.2f} s (promise: < 0.5 s)")
    if "built" in med:
        print(f"built kernel / Debian kernel+initrd, agent ready: {med['built'][0] / med['osbuilder'][0]:.2f}; "
              f"ssh ready: {med['built'][1] / med['osbuilder'][1]:.2f}")


if __name__ == "__main__":
    main()
