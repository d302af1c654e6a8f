"""Benchmark: how soon the runtimes' real agents answer the protocol clients, and what the clients add.

One boot per variant and round, each image booted the same way (the settings' profile, kernel and
accelerator), the client connected right after QEMU starts (before the guest opens its port):
  - osbuilder (baseline): osbuilder's own agent, `AgentClient.wait_ready` (JSON ping);
  - kata1: the Kata 1.x agent (../shared/peers), `Kata1Client.wait_ready` (yamux + gRPC Check);
  - cc3:   the Clear Containers 3.x agent (../shared/peers), `HyperstartClient.wait_ready` (READY).
Per boot: seconds from QEMU's start to the guest opening the agent's port (QMP VSERPORT_CHANGE) and
to the first answer (SERVING, READY or the ping reply); the difference is the time the agent's start
plus the client take once the port is open (the lead's target: <= 0.5 s); for kata1, the client's own
share of it: from the arrival of the agent's answer (its response headers) to SERVING. Then the median round trip
of `--calls` calls on the ready connection (Check, PING, ping), how many took over 0.4 s and how many
were never answered. Ratios are against the baseline of the
same round.

The images come from the WORKDIR's artifact cache (built by the boot tests, or built here once).
Usage (as root): python3 bench/bench_agent_protocols.py [--rounds 1] [--workdir WORKDIR] [--calls 20]
                [--only kata1 ...]  (`--only kata1 --calls 300`: how often a call is slow or lost)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from osbuilder import settings as S
from osbuilder.agent import PORT_NAME
from osbuilder.agent.client import AgentClient, AgentError
from osbuilder.agent.protocols import hyperstart
from osbuilder.agent.protocols.kata1 import Kata1Client
from osbuilder.artifacts import Artifacts
from osbuilder.cache import Cache
from osbuilder.layout import Workdir
from osbuilder.vm import accel as accel_mod
from osbuilder.vm import check
from osbuilder.vm.qemu import Vm, port_id

PEERS = Path(__file__).resolve().parents[1].parent / "shared" / "peers"


@dataclasses.dataclass
class Variant:
    name: str
    agent: Path | None  # AGENT_SOURCE_BIN (None: osbuilder's own agent)
    ports: tuple[str, ...]
    connect: Callable[[Vm], Any]  # the client, connected to the port's socket
    ready: Callable[[Any, float], None]  # wait (seconds) until the agent answers
    call: Callable[[Any], None]  # one round trip on the ready connection
    answered: Callable[[Any], float | None] = lambda c: None  # monotonic time the agent's answer began


VARIANTS = [
    Variant("osbuilder", None, (PORT_NAME,), lambda vm: AgentClient.connect_unix(vm.paths.agent, 10),
            lambda c, s: c.wait_ready(s, try_timeout=0.5), lambda c: c.ping(5)),
    Variant("kata1", PEERS / "kata-agent-1.x" / "kata-agent", (PORT_NAME,),
            lambda vm: Kata1Client.connect_unix(vm.paths.agent, 10),
            lambda c, s: c.wait_ready(s, try_timeout=1.0), lambda c: c.check(5),
            lambda c: c.last_answered_at),
    Variant("cc3", PEERS / "cc-agent-3.x" / "cc-agent", (hyperstart.CONTROL_PORT, hyperstart.TTY_PORT),
            lambda vm: hyperstart.HyperstartClient.connect_unix(vm.paths.port(hyperstart.CONTROL_PORT),
                                                                vm.paths.port(hyperstart.TTY_PORT), 10),
            lambda c, s: c.wait_ready(s), lambda c: c.ping(5)),
]


def port_opened(vm: Vm, port: str, wall_t0: float) -> float | None:
    for event in vm.qmp.events:
        data = event.get("data", {})
        if event.get("event") == "VSERPORT_CHANGE" and data.get("id") == port_id(port) and data.get("open"):
            ts = event["timestamp"]
            return ts["seconds"] + ts["microseconds"] / 1e6 - wall_t0
    return None


def measure(v: Variant, settings: S.Settings, artifacts: Artifacts, kernel, accel, name: str,
            calls: int) -> dict[str, float]:
    s = settings.with_values(AGENT_SOURCE_BIN=str(v.agent)) if v.agent else settings
    image = artifacts.image(s)
    opts = check.guest_options(s, image=image.path, kernel=kernel, accel=accel, name=name)
    spec = dataclasses.replace(opts.spec(), serial_ports=v.ports)
    with Vm(spec, opts.log_dir) as vm:
        wall_t0 = time.time() - (time.monotonic() - vm.t0)
        client = v.connect(vm)
        try:
            deadline = vm.t0 + opts.timeout
            while True:
                if not vm.alive() or time.monotonic() > deadline:
                    raise SystemExit(f"{v.name}: no answer within {opts.timeout:.0f}s (logs: {opts.log_dir})")
                try:
                    v.ready(client, 2.0)
                    break
                except TimeoutError:
                    continue
            ready = time.monotonic() - vm.t0
            first = v.answered(client)
            opened = port_opened(vm, v.ports[0], wall_t0)
            rtts, lost = [], 0
            for _ in range(calls):
                started = time.monotonic()
                try:
                    v.call(client)
                except AgentError:  # a call never answered (a timeout), or the client gave up after one
                    lost += 1
                    continue
                rtts.append(time.monotonic() - started)
        finally:
            client.close()
    if opened is None:
        raise SystemExit(f"{v.name}: QMP reported no VSERPORT_CHANGE for {v.ports[0]} (logs: {opts.log_dir})")
    # the client's own share: from the moment the agent's answer began to arrive to the client
    # returning it (kata1; for osbuilder's agent and READY the answer is one small read)
    client_part = ready - (first - vm.t0) if first is not None else 0.0
    return {"port_open": opened, "ready": ready, "after_open": ready - opened, "client": client_part,
            "rtt": statistics.median(rtts), "slow": sum(r > 0.4 for r in rtts), "max": max(rtts), "lost": lost}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--calls", type=int, default=20, help="round trips on the ready connection per boot")
    ap.add_argument("--only", action="append", choices=[v.name for v in VARIANTS],
                    help="measure only this variant (repeatable; ratios need osbuilder)")
    args = ap.parse_args()
    settings = S.load({"WORKDIR": args.workdir} if args.workdir else {})
    artifacts = Artifacts(Cache(Workdir.of(settings).cache))
    kernel = check.boot_kernel(settings)
    accel = accel_mod.choose(settings, kernel)
    print(f"kernel {kernel.name}, accel {accel.name}, profile {check.profiles.for_settings(settings).name}, "
          f"{settings.vm_cpus} vCPUs, load average {os.getloadavg()[0]:.2f}")
    variants = [v for v in VARIANTS if (v.agent is None or v.agent.is_file()) and v.name in (args.only or [v.name])]
    results: dict[str, list[dict[str, float]]] = {v.name: [] for v in variants}
    for r in range(args.rounds):
        for v in variants:
            m = measure(v, settings, artifacts, kernel, accel, f"bench-protocols-{v.name}-{r}", args.calls)
            results[v.name].append(m)
            print(f"round {r + 1} {v.name:<9} port open {m['port_open']:6.2f}s  answered {m['ready']:6.2f}s  "
                  f"after open {m['after_open']:5.2f}s (client {m['client']:5.3f}s)  "
                  f"round trip {m['rtt'] * 1000:6.1f} ms (>0.4 s: {m['slow']}, max {m['max']:.2f}s, "
                  f"lost {m['lost']} of {args.calls})", flush=True)
    if "osbuilder" not in results:
        return
    base = {k: statistics.median(m[k] for m in results["osbuilder"]) for k in ("after_open", "rtt")}
    print("\nmedians (ratio to osbuilder's own agent and client, the same rounds):")
    for v in variants:
        med = {k: statistics.median(m[k] for m in results[v.name])
               for k in ("port_open", "ready", "after_open", "client", "rtt")}
        print(f"  {v.name:<9} port open {med['port_open']:6.2f}s  answered {med['ready']:6.2f}s  "
              f"after open {med['after_open']:5.2f}s (x{med['after_open'] / base['after_open']:.2f}, "
              f"client {med['client']:5.3f}s)  round trip {med['rtt'] * 1000:6.1f} ms "
              f"(x{med['rtt'] / base['rtt']:.2f})")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
