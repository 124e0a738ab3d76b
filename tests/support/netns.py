"""Hosts of the test's own: network namespaces on a bridge, with links to cut and restore.

A :class:`Network` is one Linux bridge and, per host, a network namespace joined to it by a veth
pair (``eth0`` inside, a bridge port outside) with an address of a private /24 that no route or
address of this machine uses. The bridge itself holds the subnet's first address, so the test
process reaches every host, as a client on the same network would. Every name starts with a
prefix drawn per network, and :meth:`Network.remove` removes exactly what this network created
(the processes inside its namespaces first): nothing else on the machine is touched or
addressed. It needs root (``ip netns add``), and says so in one line when it is not.

Two faults, both silent, as a real network fails (packets vanish; nobody is told):

* :meth:`Network.cut` sets a host's bridge port down: its cable is pulled, every packet to or
  from it is lost; :meth:`Network.restore` plugs it in again;
* :meth:`Network.block` drops, with an nftables rule inside one host's namespace, the packets
  between that host and one other; :meth:`Network.unblock` deletes the rule.

The namespaces share the machine's filesystem and hostname: only the network is a host's own.
"""

from __future__ import annotations

import ipaddress
import os
import random
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis

SUBNETS = ipaddress.ip_network("10.0.0.0/8")
NFT_TABLE = "smoothcert_test"


class NetworkError(RuntimeError):
    """A command that builds or faults the network failed; the message names it."""


def need_root() -> str | None:
    """Why these tests cannot run here (one line), or None when they can."""
    if os.geteuid() != 0:
        return (
            "these tests make network namespaces, a bridge and veth pairs (ip netns add, "
            "ip link add), which needs root: run them as root, as CI does"
        )
    missing = [tool for tool in ("ip", "nft") if shutil.which(tool) is None]
    if missing:
        return f"these tests need {' and '.join(missing)} (apt-get install iproute2 nftables)"
    return None


def _run(*args: str, ns: str | None = None) -> str:
    command = ["ip", "netns", "exec", ns, *args] if ns else list(args)
    done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise NetworkError(f"{' '.join(command)} failed: {done.stderr.strip() or done.returncode}")
    return done.stdout


def _used_networks() -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """Every IPv4 network this machine has an address or a route in (the default route aside)."""
    used: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for line in _run("ip", "-4", "-o", "addr", "show").splitlines():
        used.append(ipaddress.ip_interface(line.split()[3]).network)
    for line in _run("ip", "-4", "route", "show", "table", "all").splitlines():
        words = line.split()
        if words and words[0] in ("broadcast", "local", "unicast", "blackhole", "unreachable"):
            words = words[1:]
        if words and words[0] != "default":
            try:
                used.append(ipaddress.ip_network(words[0], strict=False))
            except ValueError:
                pass
    return used


def free_subnet(rng: random.Random) -> ipaddress.IPv4Network:
    """A /24 of 10.0.0.0/8 that overlaps no address or route of this machine."""
    used = _used_networks()
    for _ in range(200):
        candidate = ipaddress.IPv4Network(f"10.{rng.randrange(100, 250)}.{rng.randrange(256)}.0/24")
        if not any(candidate.overlaps(net) for net in used):
            return candidate
    raise NetworkError("found no free /24 in 10.0.0.0/8 for the test's bridge")


@dataclass(frozen=True)
class Host:
    """One namespace on the bridge: its name, its address and its port on the bridge."""

    name: str
    namespace: str
    address: str
    port: str

    def command(self, args: list[str]) -> list[str]:
        """``args`` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.namespace, *args]


class Network:
    """A bridge (made by :meth:`create`) and the hosts on it; :meth:`remove` takes all of it away
    again, however far :meth:`create` and :meth:`add_host` got."""

    def __init__(self) -> None:
        self.prefix = "sc" + secrets.token_hex(3)  # 8 characters: interface names hold 15
        self.subnet = free_subnet(random.Random())
        self.bridge = f"{self.prefix}br"
        self.gateway = str(self.subnet[1])
        self.hosts: list[Host] = []
        self._created_bridge = False

    def create(self) -> None:
        """Make the bridge, with the subnet's first address, and set it up."""
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        self._created_bridge = True
        _run("ip", "addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")

    def add_host(self, name: str) -> Host:
        """A new namespace with ``eth0`` on the bridge and the subnet's next address."""
        index = len(self.hosts) + 2
        host = Host(
            name, f"{self.prefix}-{name}", str(self.subnet[index]), f"{self.prefix}v{index}"
        )
        self.hosts.append(host)  # before it exists: remove() then takes whatever was made of it
        _run("ip", "netns", "add", host.namespace)
        _run(
            "ip", "link", "add", host.port, "type", "veth", "peer", "eth0", "netns", host.namespace
        )
        _run("ip", "link", "set", host.port, "master", self.bridge, "up")
        _run("ip", "-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", "eth0")
        _run("ip", "-n", host.namespace, "link", "set", "eth0", "up")
        _run("ip", "-n", host.namespace, "link", "set", "lo", "up")
        return host

    def cut(self, host: Host) -> None:
        """Pull ``host``'s cable: its bridge port goes down, and every packet to or from it is lost."""
        _run("ip", "link", "set", host.port, "down")

    def restore(self, host: Host) -> None:
        _run("ip", "link", "set", host.port, "up")

    def block(self, host: Host, other: Host) -> None:
        """Drop every packet between ``host`` and ``other``, inside ``host``'s namespace (a
        partition between the two; both still reach everyone else)."""
        rules = (
            f"add table inet {NFT_TABLE}\n"
            f"add chain inet {NFT_TABLE} out {{ type filter hook output priority 0; }}\n"
            f"add chain inet {NFT_TABLE} in {{ type filter hook input priority 0; }}\n"
            f"add rule inet {NFT_TABLE} out ip daddr {other.address} drop\n"
            f"add rule inet {NFT_TABLE} in ip saddr {other.address} drop\n"
        )
        done = subprocess.run(
            host.command(["nft", "-f", "-"]), input=rules, capture_output=True, text=True
        )
        if done.returncode != 0:
            raise NetworkError(f"nft in {host.namespace} failed: {done.stderr.strip()}")

    def unblock(self, host: Host) -> None:
        _run("nft", "delete", "table", "inet", NFT_TABLE, ns=host.namespace)

    def remove(self, settle_s: float = 10.0) -> list[str]:
        """Kill what still runs in this network's namespaces, delete its veth pairs, namespaces
        and bridge, and wait up to ``settle_s`` for the kernel to let them go; what is left of
        them, or failed to go (nothing, normally)."""
        failed = []
        for host in self.hosts:
            pids = subprocess.run(
                ["ip", "netns", "pids", host.namespace], capture_output=True, text=True
            ).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        steps = [("ip", "link", "del", host.port) for host in self.hosts]
        steps += [("ip", "netns", "del", host.namespace) for host in self.hosts]
        steps += [("ip", "link", "del", self.bridge)] if self._created_bridge else []
        for step in steps:
            if step[-1] in self.leftovers():
                try:
                    _run(*step)
                except NetworkError as exc:
                    failed.append(str(exc))
        deadline = time.monotonic() + settle_s
        while self.leftovers() and time.monotonic() < deadline:
            time.sleep(0.1)
        return failed + [f"{name} is still there" for name in self.leftovers()]

    def leftovers(self) -> list[str]:
        """Namespaces and links of this network that still exist (none after :meth:`remove`)."""
        names = _run("ip", "netns", "list").split()
        links = _run("ip", "-o", "link", "show").split()
        return sorted(
            {w for w in names if w.startswith(self.prefix)}
            | {w.split("@")[0].rstrip(":") for w in links if w.startswith(self.prefix)}
        )


class NamespacedRedis:
    """valkey-server (or redis-server) inside ``host``, listening on its bridge address with a
    password (``protected-mode`` stays on), no persistence."""

    def __init__(self, host: Host, binary: str, folder: Path, port: int = 6379):
        self.host, self.port = host, port
        self.password = secrets.token_hex(16)
        folder.mkdir(parents=True, exist_ok=True)
        self.log = folder / "server.log"
        args = [
            binary,
            "-",  # the password comes from stdin, never the process list
            "--bind",
            host.address,
            "--port",
            str(port),
            "--dir",
            str(folder),
            "--save",
            "",
            "--appendonly",
            "no",
            "--logfile",
            str(self.log),
        ]
        self.process = subprocess.Popen(
            host.command(args),
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        assert self.process.stdin is not None
        self.process.stdin.write(f'requirepass "{self.password}"\n'.encode())
        self.process.stdin.close()
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5, socket_timeout=1)
        deadline = time.monotonic() + 15
        try:
            while not _pings(client):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    log = self.log.read_text() if self.log.exists() else ""
                    raise NetworkError(f"Redis in {host.namespace} did not start: {log[-500:]}")
                time.sleep(0.05)
        finally:
            client.close()

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@{self.host.address}:{self.port}/0"

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(10)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
