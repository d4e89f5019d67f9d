"""Removing kube-proxy's leftovers from a node that tabby now serves (the kube-proxy hand-over).

While FelixConfiguration ``bpfKubeProxyIptablesCleanupEnabled`` is true (Calico's default) and
BPF is on, the agent removes what kube-proxy wrote on its node, once per start, after its own
service NAT is programmed and attached (so no service is ever without a proxy):

- iptables, both backends (legacy and nft) and both families: every chain kube-proxy owns
  (``KUBE-*`` except kubelet's own ``KUBE-FIREWALL``, ``KUBE-KUBELET-CANARY`` and
  ``KUBE-MARK-DROP``, which kubelet recreates and relies on), and every rule of another chain
  that jumps (``-j``/``-g``) to one of them. Nothing else: user chains, their other rules, the
  built-in chains' policies and the other tables are left as they are. One
  ``iptables-restore --noflush`` per table and backend: the removal is atomic per table.
- nftables: the tables ``ip kube-proxy`` and ``ip6 kube-proxy`` (kube-proxy's nftables mode), and
  no other table.

Calico (felix/rules: KubeProxyChainPrefixes) removes a narrower, older list of chain prefixes
and leaves KUBE-MARK-MASQ / KUBE-POSTROUTING because kubelet co-owned them before Kubernetes 1.28
(IPTablesOwnershipCleanup); since then they are kube-proxy's alone and removing them is what
kube-proxy's own ``--cleanup`` does, so tabby removes them too.

Runs in the calling thread's network namespace (the agent's dataplane worker): the tools are run
as child processes, which start in their parent thread's namespace. A missing tool is no error
(nothing of that backend can be there to remove).
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

KUBELET_CHAINS = frozenset({"KUBE-FIREWALL", "KUBE-KUBELET-CANARY", "KUBE-MARK-DROP"})
NFT_TABLES = (("ip", "kube-proxy"), ("ip6", "kube-proxy"))
# (save, restore) per backend and family. The legacy ones run only where the namespace already
# has legacy tables (ip*_tables_names), so no empty table is created by looking.
IPTABLES_TOOLS = (
    ("iptables-legacy-save", "iptables-legacy-restore"),
    ("ip6tables-legacy-save", "ip6tables-legacy-restore"),
    ("iptables-nft-save", "iptables-nft-restore"),
    ("ip6tables-nft-save", "ip6tables-nft-restore"),
)
TOOL_TIMEOUT_S = 30.0
SBIN = ("/usr/sbin", "/sbin")
XTABLES_WAIT_S = 5  # restore -w: wait for the xtables lock kube-proxy and kubelet also take
JUMPS = ("-j", "--jump", "-g", "--goto")


def is_kube_proxy_chain(name: str) -> bool:
    return name.startswith("KUBE-") and name not in KUBELET_CHAINS


@dataclass
class CleanupResult:
    chains: int = 0  # KUBE-* chains deleted
    jumps: int = 0  # rules of other chains deleted (they jumped to those)
    nft_tables: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    missing_tools: list[str] = field(default_factory=list)  # nothing of theirs could be seen

    @property
    def removed_anything(self) -> bool:
        return bool(self.chains or self.jumps or self.nft_tables)


@dataclass
class _Table:
    name: str
    chains: list[str] = field(default_factory=list)
    rules: list[str] = field(default_factory=list)  # "-A CHAIN ..." lines as saved


def parse_save(text: str) -> list[_Table]:
    """The tables of an iptables-save output, with their chains and rules in order."""
    tables: list[_Table] = []
    for line in text.splitlines():
        if line.startswith("*"):
            tables.append(_Table(line[1:].strip()))
        elif not tables or not line or line.startswith("#") or line == "COMMIT":
            continue
        elif line.startswith(":"):
            tables[-1].chains.append(line[1:].split()[0])
        elif line.startswith("-A "):
            tables[-1].rules.append(line)
    return tables


def _jump_target(rule: str) -> str | None:
    try:
        words = shlex.split(rule)
    except ValueError:  # an unbalanced quote iptables-save would never print: keep the rule
        return None
    for i, word in enumerate(words[:-1]):
        if word in JUMPS:
            return words[i + 1]
    return None


def removal_script(table: _Table) -> tuple[str, int, int] | None:
    """iptables-restore --noflush input removing kube-proxy's chains from ``table`` and the
    jumps to them, with the counts (chains, jumps); None when the table holds none of it."""
    doomed = [c for c in table.chains if is_kube_proxy_chain(c)]
    if not doomed:
        return None
    gone = set(doomed)
    jumps = []
    for rule in table.rules:
        chain = rule.split()[1]
        if chain not in gone and _jump_target(rule) in gone:
            jumps.append("-D" + rule[2:])  # the saved rule, as iptables-save quoted it
    # jumps first, then every chain emptied before any is deleted (they jump to each other)
    lines = [f"*{table.name}", *jumps]
    lines += [f"-F {c}" for c in doomed] + [f"-X {c}" for c in doomed] + ["COMMIT"]
    return "\n".join(lines) + "\n", len(doomed), len(jumps)


def _tool(name: str) -> str | None:
    """The tool's path; the sbin directories too, where a service's PATH may lack them."""
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), *SBIN]))


def _run(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    path = _tool(argv[0]) or argv[0]
    return subprocess.run(
        [path, *argv[1:]],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT_S,
        check=False,
    )


def _legacy_has_tables(save: str) -> bool:
    # thread-self: /proc/net follows the process's main thread, not this one's namespace
    family = "ip6" if save.startswith("ip6") else "ip"
    names = f"/proc/thread-self/net/{family}_tables_names"
    try:
        with open(names) as f:
            return bool(f.read().strip())
    except OSError:
        return False


def remove_iptables_leftovers(result: CleanupResult) -> None:
    for save, restore in IPTABLES_TOOLS:
        if _tool(save) is None or _tool(restore) is None:
            result.missing_tools.append(save.removesuffix("-save"))
            continue
        if "legacy" in save and not _legacy_has_tables(save):
            continue
        done = _run([save])
        if done.returncode != 0:
            result.errors.append(f"{save}: {done.stderr.strip() or done.returncode}")
            continue
        for table in parse_save(done.stdout):
            script = removal_script(table)
            if script is None:
                continue
            text, chains, jumps = script
            applied = _run([restore, "-w", str(XTABLES_WAIT_S), "--noflush"], text)
            if applied.returncode != 0:
                result.errors.append(
                    f"{restore} ({table.name}): {applied.stderr.strip() or applied.returncode}"
                )
                continue
            log.info(
                "kube-proxy cleanup: %s table %s: %d chains, %d jumps removed",
                save.removesuffix("-save"), table.name, chains, jumps,
            )  # fmt: skip
            result.chains += chains
            result.jumps += jumps


def remove_nft_tables(result: CleanupResult) -> None:
    if _tool("nft") is None:
        result.missing_tools.append("nft")
        return
    listed = _run(["nft", "list", "tables"])
    if listed.returncode != 0:
        result.errors.append(f"nft list tables: {listed.stderr.strip()}")
        return
    present = {tuple(line.split()[1:3]) for line in listed.stdout.splitlines() if line.strip()}
    for family, name in NFT_TABLES:
        if (family, name) not in present:
            continue
        done = _run(["nft", "delete", "table", family, name])
        if done.returncode != 0:
            result.errors.append(f"nft delete table {family} {name}: {done.stderr.strip()}")
            continue
        log.info("kube-proxy cleanup: nft table %s %s deleted", family, name)
        result.nft_tables.append(f"{family} {name}")


def cleanup() -> CleanupResult:
    """Remove kube-proxy's iptables chains and nft tables in this thread's network namespace."""
    result = CleanupResult()
    remove_iptables_leftovers(result)
    remove_nft_tables(result)
    return result
