#!/usr/bin/env python3
"""bench/kube-proxy-gen.py - iptables-restore input shaped like kube-proxy's (iptables mode).

    kube-proxy-gen.py full SERVICES            the whole ruleset (nat and filter), for
                                               `iptables-restore --noflush`
    kube-proxy-gen.py sync SERVICES ROUND      one partial sync as kube-proxy >= 1.27
                                               writes it: every chain declared, nat's
                                               KUBE-SERVICES and the whole filter table
                                               rewritten, and the chains of the few
                                               Services whose endpoints changed (ROUND
                                               picks which, and their new endpoints)

Per Service: one ClusterIP rule in nat KUBE-SERVICES, a KUBE-SVC-* chain (masquerade mark
plus one probability rule per endpoint) and a KUBE-SEP-* chain per endpoint (mark + DNAT),
two endpoints each: 8 nat rules a Service, so 5,000 Services are ~40,000 nat rules. One
Service in ten has no endpoints and gets a REJECT in filter KUBE-SERVICES instead, as
kube-proxy does; filter also holds KUBE-FORWARD, KUBE-FIREWALL and the jumps from the
built-in chains. Chain names are hashes of the Service's name, like kube-proxy's.
"""
import base64
import hashlib
import sys

CHANGED_PER_SYNC = 5
ENDPOINTS = 2


def chain(prefix, *parts):
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return prefix + base64.b32encode(digest).decode()[:16]


def svc_ip(i):
    return f"10.96.{(i // 250) + 1}.{(i % 250) + 1}"


def ep_ip(i, e, gen):
    n = i * ENDPOINTS + e + gen * 7919
    return f"10.{(n >> 16) % 200 + 1}.{(n >> 8) % 256}.{n % 250 + 2}"


def has_endpoints(i):
    return i % 10 != 9


def gen_of(i, round_):
    """Which endpoint generation Service i is at after ROUND syncs."""
    changed = {(round_ * CHANGED_PER_SYNC + k) % SERVICES for k in range(CHANGED_PER_SYNC)}
    return round_ if i in changed else 0


def svc_chains(i, gen):
    name = f"ns{i % 50}/svc{i}:http"
    svc = chain("KUBE-SVC-", name)
    seps = [chain("KUBE-SEP-", name, ep_ip(i, e, gen)) for e in range(ENDPOINTS)]
    return name, svc, seps


def nat_service(i, gen, out_decl, out_rules):
    name, svc, seps = svc_chains(i, gen)
    ip = svc_ip(i)
    out_decl += [f":{svc} - [0:0]"] + [f":{s} - [0:0]" for s in seps]
    out_rules.append(
        f'-A {svc} ! -s 10.244.0.0/16 -d {ip}/32 -p tcp -m comment --comment "{name} cluster IP" '
        f"-m tcp --dport 80 -j KUBE-MARK-MASQ"
    )
    for e, sep in enumerate(seps):
        ep = ep_ip(i, e, gen)
        left = ENDPOINTS - e
        prob = "" if left == 1 else f" -m statistic --mode random --probability {1 / left:.11f}"
        out_rules.append(f'-A {svc} -m comment --comment "{name} -> {ep}:8080"{prob} -j {sep}')
        out_rules.append(f'-A {sep} -s {ep}/32 -m comment --comment "{name}" -j KUBE-MARK-MASQ')
        out_rules.append(
            f'-A {sep} -p tcp -m comment --comment "{name}" -m tcp -j DNAT --to-destination {ep}:8080'
        )


def kube_services(round_):
    rules = []
    for i in range(SERVICES):
        if not has_endpoints(i):
            continue
        name, svc, _ = svc_chains(i, gen_of(i, round_))
        rules.append(
            f'-A KUBE-SERVICES -d {svc_ip(i)}/32 -p tcp -m comment --comment "{name} cluster IP" '
            f"-m tcp --dport 80 -j {svc}"
        )
    rules.append(
        '-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be '
        'the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS'
    )
    return rules


def filter_table():
    decl = [":KUBE-SERVICES - [0:0]", ":KUBE-EXTERNAL-SERVICES - [0:0]", ":KUBE-FORWARD - [0:0]",
            ":KUBE-FIREWALL - [0:0]", ":KUBE-NODEPORTS - [0:0]", ":KUBE-PROXY-FIREWALL - [0:0]"]
    rules = []
    for i in range(SERVICES):
        if not has_endpoints(i):
            rules.append(
                f'-A KUBE-SERVICES -d {svc_ip(i)}/32 -p tcp -m comment --comment '
                f'"ns{i % 50}/svc{i}:http has no endpoints" -m tcp --dport 80 -j REJECT '
                "--reject-with icmp-port-unreachable"
            )
    rules += [
        '-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP',
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT',
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT',
        '-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment "block incoming localnet connections" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP',
    ]
    return decl, rules


NAT_FIXED = [
    "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000",
    "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
    "-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0",
    '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" '
    "-j MASQUERADE --random-fully",
]


def full():
    print("*nat")
    decl = [":KUBE-SERVICES - [0:0]", ":KUBE-NODEPORTS - [0:0]", ":KUBE-POSTROUTING - [0:0]",
            ":KUBE-MARK-MASQ - [0:0]"]
    rules = []
    for i in range(SERVICES):
        if has_endpoints(i):
            nat_service(i, 0, decl, rules)
    print("\n".join(decl))
    print("-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES")
    print("-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES")
    print("-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING")
    print("\n".join(NAT_FIXED))
    print("\n".join(rules))
    print("\n".join(kube_services(0)))
    print("COMMIT")
    print("*filter")
    decl, rules = filter_table()
    print("\n".join(decl))
    print("-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL")
    print("-A INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS")
    print("-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES")
    print("-A INPUT -j KUBE-FIREWALL")
    print("-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD")
    print("-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES")
    print("-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES")
    print("-A OUTPUT -j KUBE-FIREWALL")
    print("\n".join(rules))
    print("COMMIT")


def sync(round_):
    """kube-proxy's partial restore: the previous round's changed Services lose their old
    chains, this round's get new ones, KUBE-SERVICES and filter are rewritten whole."""
    print("*filter")
    decl, rules = filter_table()
    print("\n".join(decl))
    print("\n".join(rules))
    print("COMMIT")
    print("*nat")
    decl = [":KUBE-SERVICES - [0:0]", ":KUBE-NODEPORTS - [0:0]", ":KUBE-POSTROUTING - [0:0]",
            ":KUBE-MARK-MASQ - [0:0]"]
    rules = []
    gone = []
    changed = sorted({(round_ * CHANGED_PER_SYNC + k) % SERVICES for k in range(CHANGED_PER_SYNC)})
    for i in changed:
        if not has_endpoints(i):
            continue
        nat_service(i, round_, decl, rules)
        # The chains this Service had before this round (generation 0 or its last round).
        before = [r for r in range(round_) if i in
                  {(r * CHANGED_PER_SYNC + k) % SERVICES for k in range(CHANGED_PER_SYNC)}]
        old_gen = before[-1] if before else 0
        _, _, old_seps = svc_chains(i, old_gen)
        _, _, new_seps = svc_chains(i, round_)
        gone += [s for s in old_seps if s not in new_seps]
    print("\n".join(decl + [f":{s} - [0:0]" for s in gone]))
    print("\n".join(NAT_FIXED))
    print("\n".join(kube_services(round_)))
    print("\n".join(rules))
    for s in gone:
        print(f"-X {s}")
    print("COMMIT")


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in ("full", "sync"):
        sys.exit(__doc__)
    SERVICES = int(sys.argv[2])
    if SERVICES < 1:
        sys.exit("SERVICES must be at least 1")
    if sys.argv[1] == "full":
        full()
    else:
        sync(int(sys.argv[3]) if len(sys.argv) > 3 else 1)
