"""Connect-time load balancing's socket maps (mirrors of types.h): what the application asked
for, behind each translation of bpf/cgroup_ctlb.c.

- ``tby_ctlb_conns`` (``tby_ctlb_conns6``): a connected socket's (TCP, connected UDP) backend
  and frontend, in the socket's own storage (freed with it). Read back by getpeername/recvmsg
  and by the stale-UDP reaper (a connected socket whose backend left its frontend is
  destroyed). Userspace can only read it through a socket fd.
- ``tby_ctlb_sk`` (``tby_ctlb_sk6``): unconnected UDP, (socket cookie, backend) -> frontend
  per datagram's backend, for recvmsg. An LRU: entries of closed sockets age out.

The agent never writes either.
"""

from __future__ import annotations

import ctypes
import ipaddress

from tabby.bpf.maps.spec import (
    BPF_F_NO_PREALLOC,
    BPF_MAP_TYPE_LRU_HASH,
    BPF_MAP_TYPE_SK_STORAGE,
    MapSpec,
)

_be16 = ctypes.c_uint16.__ctype_be__
_be32 = ctypes.c_uint32.__ctype_be__


def _str(addr: int) -> str:
    return str(ipaddress.IPv4Address(addr))


class CtlbSockKey(ctypes.Structure):
    """struct tby_ctlb_sk_key; also the record tby_ctlb_reap writes per destroyed socket."""

    _fields_ = [
        ("cookie", ctypes.c_uint64),
        ("addr", _be32),
        ("port", _be16),
        ("_pad", ctypes.c_uint16),
    ]

    def describe(self) -> str:
        return f"socket {self.cookie} -> {_str(self.addr)}:{self.port}"


class CtlbSockValue(ctypes.Structure):
    """struct tby_ctlb_sk_val."""

    _fields_ = [("addr", _be32), ("port", _be16), ("_pad", ctypes.c_uint16)]

    def describe(self) -> str:
        return f"{_str(self.addr)}:{self.port}"


class CtlbConn(ctypes.Structure):
    """struct tby_ctlb_conn: a connected socket's translation."""

    _fields_ = [("be_addr", _be32), ("fe_addr", _be32), ("be_port", _be16), ("fe_port", _be16)]


class CtlbConn6(ctypes.Structure):
    """struct tby_ctlb_conn6: a connected IPv6 socket's translation."""

    _fields_ = [
        ("be_addr", ctypes.c_uint8 * 16),
        ("fe_addr", ctypes.c_uint8 * 16),
        ("be_port", _be16),
        ("fe_port", _be16),
    ]


class CtlbSock6Key(ctypes.Structure):
    """struct tby_ctlb_sk6_key."""

    _fields_ = [
        ("cookie", ctypes.c_uint64),
        ("addr", ctypes.c_uint8 * 16),
        ("port", _be16),
        ("_pad", ctypes.c_uint16),
        ("_pad2", ctypes.c_uint32),
    ]

    def describe(self) -> str:
        return f"socket {self.cookie} -> [{ipaddress.IPv6Address(bytes(self.addr))}]:{self.port}"


class CtlbSock6Value(ctypes.Structure):
    """struct tby_ctlb_sk6_val."""

    _fields_ = [("addr", ctypes.c_uint8 * 16), ("port", _be16), ("_pad", ctypes.c_uint16)]

    def describe(self) -> str:
        return f"[{ipaddress.IPv6Address(bytes(self.addr))}]:{self.port}"


CTLB_SOCKETS6_SPEC = MapSpec(
    "tby_ctlb_sk6", BPF_MAP_TYPE_LRU_HASH, CtlbSock6Key, CtlbSock6Value, 65536
)
CTLB_SOCKETS_SPEC = MapSpec(
    "tby_ctlb_sk", BPF_MAP_TYPE_LRU_HASH, CtlbSockKey, CtlbSockValue, 262144
)
CTLB_CONNS_SPEC = MapSpec(
    "tby_ctlb_conns", BPF_MAP_TYPE_SK_STORAGE, ctypes.c_int, CtlbConn, 0, BPF_F_NO_PREALLOC
)
CTLB_CONNS6_SPEC = MapSpec(
    "tby_ctlb_conns6", BPF_MAP_TYPE_SK_STORAGE, ctypes.c_int, CtlbConn6, 0, BPF_F_NO_PREALLOC
)


def parse_reaped(data: bytes) -> list[CtlbSockKey]:
    """The records an iterator run of tby_ctlb_reap wrote: one per destroyed socket."""
    size = ctypes.sizeof(CtlbSockKey)
    if len(data) % size:
        raise ValueError(f"reaper output of {len(data)} bytes is not a whole number of records")
    return [CtlbSockKey.from_buffer_copy(data, off) for off in range(0, len(data), size)]
