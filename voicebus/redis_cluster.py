"""A real Redis Cluster on loopback, for tests and benchmarks.

Each node is an ``EmbeddedRedis`` (same binary, same private directory and AOF, dies with
its parent) started with cluster options. The cluster is formed with plain cluster
commands through redis-py rather than ``redis-cli --cluster create``: a user's machine
may only have the pip-shipped ``redis-server``, with no ``redis-cli`` beside it.

``start()`` returns only once a cluster client can write and read on every master, so a
test never sees a half-formed cluster; ``kill_master_for_key`` and ``wait_for_failover``
drive the failure a production cluster has to survive.
"""

from __future__ import annotations

import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from redis.cluster import RedisCluster
from redis.crc import key_slot

from voicebus import processes
from voicebus.processes import free_port
from voicebus.redis_server import EmbeddedRedis, RedisLaunchError, find_redis_server

SLOTS = 16384
# Redis < 7 (the pip-shipped 6.2) has no ``cluster-port``: the bus is always port + 10000,
# so a node's port must leave room for it and the bus port must be free as well.
BUS_PORT_OFFSET = 10000
POLL_S = 0.05


@dataclass
class ClusterNode:
    """One node: its server, its cluster id, and the master it was started to replicate."""

    server: EmbeddedRedis
    node_id: str = ""
    replica_of: ClusterNode | None = None  # None: started as a master
    killed: bool = False

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def pid(self) -> int | None:
        return self.server.pid


@dataclass(frozen=True)
class _NodeView:
    """One line of ``CLUSTER NODES``: what one node believes about another."""

    node_id: str
    port: int
    flags: frozenset[str]
    master_id: str  # "-" for a master
    slots: tuple[tuple[int, int], ...]

    def owns(self, slot: int) -> bool:
        return any(lo <= slot <= hi for lo, hi in self.slots)


def _parse_nodes(text: str) -> list[_NodeView]:
    views = []
    for line in text.strip().splitlines():
        fields = line.split()
        addr = fields[1].split("@")[0]  # ip:port@cport[,hostname]
        slots = []
        for item in fields[8:]:
            if item.startswith("["):  # a slot being migrated or imported
                continue
            lo, _, hi = item.partition("-")
            slots.append((int(lo), int(hi or lo)))
        views.append(_NodeView(fields[0], int(addr.rsplit(":", 1)[1]),
                               frozenset(fields[2].split(",")), fields[3], tuple(slots)))
    return views


def _parse_info(reply: str | dict[str, Any]) -> dict[str, str]:
    """``CLUSTER INFO`` comes back as raw text, ``INFO`` already parsed by redis-py."""
    if isinstance(reply, dict):
        return {k: str(v) for k, v in reply.items()}
    pairs = (line.split(":", 1) for line in reply.splitlines() if ":" in line)
    return {k.strip(): v.strip() for k, v in pairs}


def _free_port_pair() -> int:
    """A free loopback port whose cluster-bus port (port + 10000) is free too."""
    for _ in range(200):
        port = free_port()
        if port + BUS_PORT_OFFSET > 65535:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port + BUS_PORT_OFFSET))
            except OSError:
                continue
        return port
    raise RedisLaunchError("no free port whose cluster-bus port (+10000) is free too")


def _key_in_slots(lo: int, hi: int, prefix: str = "voicebus:cluster-probe") -> str:
    """A key whose slot lies in ``lo..hi`` (to reach one given master)."""
    for i in range(1_000_000):
        key = f"{prefix}:{i}"
        if lo <= key_slot(key.encode()) <= hi:
            return key
    raise ValueError(f"no key found for slots {lo}-{hi}")


class LocalRedisCluster(processes.ChildServer):
    """``masters`` masters with ``replicas_per_master`` replicas each, on loopback.

    ``node_timeout_ms`` is how long a node may be silent before it is suspected failed;
    the default of 1 s (Redis's is 15 s) makes a failover take a few seconds in tests.

    ``acl_file``: every node loads these users (as a production cluster must: ACLs are per
    node, not replicated), plus an admin user of its own that forms the cluster and
    that replicas authenticate as (``masteruser``), so the file may turn ``default`` off.
    """

    def __init__(self, masters: int = 3, replicas_per_master: int = 1,
                 binary: str | None = None, node_timeout_ms: int = 1000,
                 acl_file: Path | None = None) -> None:
        if masters < 1 or replicas_per_master < 0:
            raise ValueError("a cluster needs at least one master and no negative replicas")
        self.binary = binary or find_redis_server()
        self.n_masters = masters
        self.replicas_per_master = replicas_per_master
        self.node_timeout_ms = node_timeout_ms
        self.acl_file = acl_file
        # Our own connections' user (the admin of ``acl_file``), or None: the default user.
        self._username: str | None = None
        self._password: str | None = None
        self._acl_dir: Path | None = None
        self.nodes: list[ClusterNode] = []  # masters first, in slot order, then replicas
        self._clients: dict[int, redis.Redis] = {}

    # -- addresses -------------------------------------------------------------------------

    @property
    def live_nodes(self) -> list[ClusterNode]:
        return [n for n in self.nodes if not n.killed]

    @property
    def _seed(self) -> ClusterNode:
        """The node clients start discovery from: the first one still alive (after a
        failover test kills the first master, a fresh client must still find the cluster)."""
        if not self.live_nodes:
            raise RuntimeError("the cluster is not running")
        return self.live_nodes[0]

    @property
    def url(self) -> str:
        """``redis+cluster://``: the scheme that tells voicebus to use a cluster client."""
        return f"redis+cluster://127.0.0.1:{self._seed.port}"

    @property
    def plain_url(self) -> str:
        """One node's ``redis://`` URL (what redis-py's own ``from_url`` accepts)."""
        return f"redis://127.0.0.1:{self._seed.port}"

    def url_as(self, user: str, password: str) -> str:
        """``url`` with an ACL user's credentials."""
        return f"redis+cluster://{user}:{password}@127.0.0.1:{self._seed.port}"

    # -- life ------------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        try:
            if self.acl_file is not None:
                self._write_acl(self.acl_file)
            for i in range(self.n_masters * (1 + self.replicas_per_master)):
                master = None if i < self.n_masters else self.nodes[i % self.n_masters]
                self.nodes.append(ClusterNode(self._start_node(master), replica_of=master))
            self._form(deadline)
        except BaseException:
            self.stop()
            raise
        return self.url

    def stop(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()
        nodes, self.nodes = self.nodes, []
        for node in nodes:
            node.server.stop()
        if self._acl_dir is not None:
            shutil.rmtree(self._acl_dir, ignore_errors=True)
            self._acl_dir = None

    def _write_acl(self, users: Path) -> None:
        """The users' file plus our admin, in a file every node loads (``--aclfile``)."""
        self._username, self._password = "voicebus-cluster-admin", secrets.token_hex(16)
        self._acl_dir = Path(tempfile.mkdtemp(prefix="voicebus-cluster-acl-"))
        text = users.read_text().rstrip("\n")
        admin = f"user {self._username} on >{self._password} ~* &* +@all"
        (self._acl_dir / "users.acl").write_text(f"{text}\n{admin}\n")

    def _start_node(self, master: ClusterNode | None) -> EmbeddedRedis:
        last: RedisLaunchError | None = None
        for _ in range(5):  # a port pair can be taken between our probe and the bind
            port = _free_port_pair()
            args = [
                "--cluster-enabled", "yes",
                "--cluster-config-file", f"nodes-{port}.conf",
                "--cluster-node-timeout", str(self.node_timeout_ms),
                # A replica whose link to its master was down for a while refuses by default
                # to take over (it may lack recent writes). In a test that kills a master
                # the replica must take over however stale it is, or the slot stays down;
                # on every node, since a master may become a replica after a failover.
                "--cluster-replica-validity-factor", "0",
            ]  # fmt: skip
            if self._acl_dir is not None:
                args += ["--aclfile", str(self._acl_dir / "users.acl"),
                         "--masteruser", str(self._username),
                         "--masterauth", str(self._password)]
            server = EmbeddedRedis(port=port, binary=self.binary, extra_args=args)
            try:
                server.start()
                return server
            except RedisLaunchError as exc:
                server.stop()
                last = exc
        raise RedisLaunchError(f"a cluster node would not start: {last}")

    def _form(self, deadline: float) -> None:
        masters = self.nodes[: self.n_masters]
        for i, node in enumerate(self.nodes):
            node.node_id = self._cmd(node, "CLUSTER", "MYID")
            # Distinct epochs up front (as redis-cli does) spare the nodes resolving
            # epoch collisions among themselves before the cluster settles.
            self._cmd(node, "CLUSTER", "SET-CONFIG-EPOCH", i + 1)
        for i, master in enumerate(masters):
            lo = i * SLOTS // self.n_masters
            hi = (i + 1) * SLOTS // self.n_masters - 1
            try:
                self._cmd(master, "CLUSTER", "ADDSLOTSRANGE", lo, hi)
            except redis.ResponseError:  # Redis < 7 has no ADDSLOTSRANGE
                self._cmd(master, "CLUSTER", "ADDSLOTS", *range(lo, hi + 1))
        for node in self.nodes[1:]:
            self._cmd(self.nodes[0], "CLUSTER", "MEET", "127.0.0.1", node.port)
        self._wait(deadline, self._everyone_known, "every node to know every other",
                   RedisLaunchError)
        for node in self.nodes:
            if node.replica_of is not None:
                self._cmd(node, "CLUSTER", "REPLICATE", node.replica_of.node_id)
        self._wait(deadline, self._formed, "cluster_state:ok and every replica in sync",
                   RedisLaunchError)
        self._wait(deadline, self._serves_every_master,
                   "a cluster client to write and read on every master", RedisLaunchError)

    # -- failure tests ---------------------------------------------------------------------

    def master_for_key(self, key: str) -> ClusterNode:
        """The node serving ``key``'s slot now, as the first live node sees it."""
        slot = key_slot(key.encode())
        for view in self._views(self._seed):
            if "master" in view.flags and "fail" not in view.flags and view.owns(slot):
                return self._by_port(view.port)
        raise LookupError(f"no live master serves slot {slot} (key {key!r})")

    def kill_master_for_key(self, key: str) -> ClusterNode:
        """SIGKILL the master serving ``key`` (no clean shutdown, as in a crash)."""
        node = self.master_for_key(key)
        node.server.kill()
        node.killed = True
        client = self._clients.pop(node.port, None)
        if client is not None:
            client.close()
        return node

    def wait_for_failover(self, key: str, timeout: float = 30.0) -> None:
        """Until every live node says ``cluster_state:ok`` and agrees that ``key``'s slot is
        served by a live master (a replica promoted in place of the killed one)."""
        slot = key_slot(key.encode())

        def served() -> str | None:
            owners = set()
            for node in self.live_nodes:
                state = _parse_info(self._cmd(node, "CLUSTER", "INFO")).get("cluster_state")
                if state != "ok":
                    return f"node {node.port}: cluster_state:{state}"
                owners |= {v.port for v in self._views(node)
                           if "master" in v.flags and v.owns(slot)}
            live = {n.port for n in self.live_nodes}
            if len(owners) != 1 or not owners <= live:
                return f"slot {slot} served by {sorted(owners)}, live nodes {sorted(live)}"
            return None

        self._wait(time.monotonic() + timeout, served, f"failover of slot {slot}",
                   TimeoutError)

    # -- readiness checks: None when met, else what is missing ------------------------------

    def _everyone_known(self) -> str | None:
        ids = {n.node_id for n in self.nodes}
        for node in self.nodes:
            views = self._views(node)
            known = {v.node_id for v in views if not v.flags & {"handshake", "noaddr"}}
            if known != ids:
                return f"node {node.port} knows {len(known)} of {len(ids)} nodes"
        return None

    def _formed(self) -> str | None:
        for node in self.nodes:
            info = _parse_info(self._cmd(node, "CLUSTER", "INFO"))
            if info.get("cluster_state") != "ok":
                return f"node {node.port}: cluster_state:{info.get('cluster_state')}"
            # Every node must see every replica as such: masters grant a replica's failover
            # vote only if they know it replicates the failed master.
            views = {v.node_id: v for v in self._views(node)}
            for replica in self.nodes[self.n_masters:]:
                assert replica.replica_of is not None
                view = views.get(replica.node_id)
                if view is None or "slave" not in view.flags \
                        or view.master_id != replica.replica_of.node_id:
                    return f"node {node.port} does not see {replica.port} as a replica yet"
        for replica in self.nodes[self.n_masters:]:  # synced, so WAIT can count it
            status = _parse_info(self._cmd(replica, "INFO", "replication")).get(
                "master_link_status")
            if status != "up":
                return f"replica {replica.port}: master_link_status:{status}"
        return None

    def _serves_every_master(self) -> str | None:
        client = RedisCluster(host="127.0.0.1", port=self._seed.port, decode_responses=True,
                              socket_timeout=2, username=self._username,
                              password=self._password)
        try:
            for i in range(self.n_masters):
                key = _key_in_slots(i * SLOTS // self.n_masters,
                                    (i + 1) * SLOTS // self.n_masters - 1)
                client.set(key, "ok")
                if client.get(key) != "ok":
                    return f"key {key} did not read back"
                client.delete(key)
        finally:
            client.close()
        return None

    # -- plumbing --------------------------------------------------------------------------

    def _wait(self, deadline: float, check: Callable[[], str | None], what: str,
              error: type[Exception]) -> None:
        while True:
            try:
                reason = check()
            except (redis.RedisError, OSError) as exc:
                reason = f"{type(exc).__name__}: {exc}"
            if reason is None:
                return
            if time.monotonic() >= deadline:
                raise error(f"Redis Cluster: timed out waiting for {what}: {reason}\n"
                            + self._log_tails())
            time.sleep(POLL_S)

    def _cmd(self, node: ClusterNode, *args: str | int) -> Any:
        client = self._clients.get(node.port)
        if client is None:
            client = redis.Redis(host="127.0.0.1", port=node.port, decode_responses=True,
                                 socket_timeout=2, socket_connect_timeout=2,
                                 username=self._username, password=self._password)
            self._clients[node.port] = client
        # Separate words ("CLUSTER", "NODES") skip redis-py's reply parsing: we get raw text.
        return client.execute_command(*args)  # type: ignore[no-untyped-call]

    def _views(self, node: ClusterNode) -> list[_NodeView]:
        return _parse_nodes(self._cmd(node, "CLUSTER", "NODES"))

    def _by_port(self, port: int) -> ClusterNode:
        return next(n for n in self.nodes if n.port == port)

    def _log_tails(self, chars: int = 1500) -> str:
        tails = []
        for node in self.nodes:
            # EmbeddedRedis keeps its log in its private directory (redis_server.py).
            log = node.server._dir / "redis.log"
            text = log.read_text(errors="replace")[-chars:] if log.exists() else "(no log)"
            role = "replica" if node.replica_of else "master"
            tails.append(f"--- {role} node {node.port} ({'killed' if node.killed else 'live'})"
                         f" log tail ---\n{text}")
        return "\n".join(tails)
