//! A classic BPF socket filter for the nftables notification socket: the kernel drops,
//! before they are queued, the datagrams that certainly concern only tables localdns does
//! not watch.
//!
//! Why: on a node whose kube-proxy runs in iptables mode, every sync rewrites nat's
//! KUBE-SERVICES (one rule per Service) and some KUBE-SVC/SEP chains, thousands of rule
//! notifications a second that localdns would otherwise copy out, walk and throw away,
//! and that can overrun the socket's buffer (an overrun counts as a change of every
//! table, so a full check).
//!
//! Sound, not exact: a datagram is dropped only when every message in it is one that
//! [`super::touched`] skips (not nf_tables, a generation message) or names, in its first
//! attribute, a table whose name does not start with any watched name. Anything else
//! passes: a message that is malformed, too short, whose first attribute is not the table
//! name, more messages than the program unrolls ([`MESSAGES`]). The family is not looked
//! at (a watched name in any family passes). The unit test runs the program over a few
//! thousand generated datagrams, well-formed and broken, in an interpreter with the
//! kernel's semantics (a load out of bounds drops) and checks that nothing userspace
//! would count is dropped.

/// The most messages per datagram a program reads (fewer if they would not fit in
/// `BPF_MAXINSNS`); a datagram with more passes. The kernel charges a socket's filter,
/// after its translation to eBPF, against `net.core.optmem_max` (20 KiB on older
/// kernels), so [`super::Events::subscribe`] halves the count until one is taken.
pub const MESSAGES: usize = 32;

/// One instruction (`struct sock_filter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

/// An instruction that does not jump.
fn insn(code: u16, k: u32) -> Insn {
    Insn {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

/// The program, as the kernel takes it.
#[derive(Debug, Clone)]
pub struct Program(pub Vec<Insn>);

impl Program {
    pub fn filters(&self) -> Vec<socket2::SockFilter> {
        self.0
            .iter()
            .map(|i| socket2::SockFilter::new(i.code, i.jt, i.jf, i.k))
            .collect()
    }
}

// linux/filter.h
const LD: u16 = 0x00;
const LDX: u16 = 0x01;
const ST: u16 = 0x02;
const ALU: u16 = 0x04;
const JMP: u16 = 0x05;
const RET: u16 = 0x06;
const MISC: u16 = 0x07;
const W: u16 = 0x00;
const H: u16 = 0x08;
const B: u16 = 0x10;
const IND: u16 = 0x40;
const MEM: u16 = 0x60;
const LEN: u16 = 0x80;
const ADD: u16 = 0x00;
const SUB: u16 = 0x10;
const OR: u16 = 0x40;
const AND: u16 = 0x50;
const LSH: u16 = 0x60;
const JA: u16 = 0x00;
const JEQ: u16 = 0x10;
const JGT: u16 = 0x20;
const JGE: u16 = 0x30;
const K: u16 = 0x00;
const X: u16 = 0x08;
const IMM: u16 = 0x00;
#[cfg(test)]
const ABS: u16 = 0x20;
const TAX: u16 = 0x00;
const TXA: u16 = 0x80;
/// `BPF_MAXINSNS`.
const MAX_INSNS: usize = 4096;

/// Return values: keep the whole datagram, or drop it.
const KEEP: u32 = u32::MAX;
const DROP: u32 = 0;

/// Scratch memory slots.
const OFF: u32 = 0; // offset of the message being read
const PKT: u32 = 1; // datagram length
const MSG: u32 = 2; // its nlmsg_len
const NEXT: u32 = 3; // offset of the next message
const ATTR: u32 = 4; // nla_len of its first attribute
const TMP: u32 = 5;

// The netlink and nf_tables layout (see the parent module).
const NLMSG_HDRLEN: u32 = 16;
const NFNL_SUBSYS_NFTABLES: u32 = 10;
const NFT_MSG_NEWGEN: u32 = 16;
const NFT_MSG_GETGEN: u32 = 17;
/// nlmsghdr + nfgenmsg: where the attributes start.
const ATTRS: u32 = 20;

/// Where a jump goes, within one message's block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum To {
    /// The next instruction.
    On,
    /// The instruction at this index of the block.
    At(usize),
    Skip,
    Keep,
    Drop,
}

/// One message's block, with symbolic jumps resolved when it is finished.
struct Block {
    code: Vec<(u16, To, To, u32)>,
}

impl Block {
    fn op(&mut self, code: u16, k: u32) {
        self.code.push((code, To::On, To::On, k));
    }

    fn jump(&mut self, code: u16, k: u32, jt: To, jf: To) {
        self.code.push((code, jt, jf, k));
    }

    fn here(&self) -> usize {
        self.code.len()
    }

    /// `A = little-endian u16 at X + at` (BPF loads are big-endian); clobbers `X`.
    fn le16(&mut self, at: u32) {
        self.op(LDX | MEM, OFF);
        self.op(LD | B | IND, at + 1);
        self.op(ALU | LSH | K, 8);
        self.op(ST, TMP); // scratch
        self.op(LD | B | IND, at);
        self.op(LDX | MEM, TMP);
        self.op(ALU | OR | X, 0);
    }

    /// Appends the block's tail (skip to the next message, drop, keep) and resolves.
    fn finish(mut self) -> Vec<Insn> {
        let skip = self.here();
        self.op(LD | MEM, NEXT);
        self.op(ST, OFF);
        self.jump(JMP | JA, 2, To::On, To::On);
        let drop = self.here();
        self.op(RET | K, DROP);
        let keep = self.here();
        self.op(RET | K, KEEP);
        let resolve = |from: usize, to: To| -> u8 {
            let target = match to {
                To::On => from + 1,
                To::At(i) => i,
                To::Skip => skip,
                To::Keep => keep,
                To::Drop => drop,
            };
            u8::try_from(target - from - 1).expect("a block is shorter than 256 instructions")
        };
        self.code
            .iter()
            .enumerate()
            .map(|(i, &(code, jt, jf, k))| {
                let conditional = code & 0x07 == JMP && code & 0xf0 != JA;
                Insn {
                    code,
                    jt: if conditional { resolve(i, jt) } else { 0 },
                    jf: if conditional { resolve(i, jf) } else { 0 },
                    k,
                }
            })
            .collect()
    }
}

/// The filter for `watched` table names that reads up to `messages` messages of a
/// datagram (see the module doc).
pub fn program(watched: &[&str], messages: usize) -> Program {
    let mut names: Vec<&[u8]> = watched.iter().map(|w| w.as_bytes()).collect();
    names.sort();
    names.dedup();
    if names.iter().any(|n| n.is_empty() || n.len() > 64) {
        return Program(vec![insn(RET | K, KEEP)]);
    }
    let mut out = vec![
        insn(LD | W | LEN, 0),
        insn(ST, PKT),
        insn(LD | IMM, 0),
        insn(ST, OFF),
    ];
    // More messages than unrolled: keep, unless the datagram ended.
    let mut tail = Block { code: Vec::new() };
    end_or(&mut tail, To::Keep);
    tail.op(RET | K, KEEP);
    let tail = tail.finish();
    let block = message(&names);
    let room = (MAX_INSNS - out.len() - tail.len()) / block.len();
    for _ in 0..messages.min(room) {
        out.extend_from_slice(&block);
    }
    out.extend(tail);
    // The tail's own skip jumps one past its end: the kernel checks every jump lands
    // inside the program, reached or not.
    out.push(insn(RET | K, KEEP));
    Program(out)
}

/// `rest = PKT - OFF`; drops when fewer than a header's bytes are left (every message
/// was skipped), else goes to `then`.
fn end_or(b: &mut Block, then: To) {
    b.op(LD | MEM, PKT);
    b.op(LDX | MEM, OFF);
    b.op(ALU | SUB | X, 0);
    b.jump(JMP | JGE | K, NLMSG_HDRLEN, then, To::Drop);
}

/// The block that reads the message at `OFF`.
fn message(names: &[&[u8]]) -> Vec<Insn> {
    let mut b = Block { code: Vec::new() };
    end_or(&mut b, To::On);
    // nlmsg_len, little-endian; above 64 KiB it is not read here.
    b.op(LDX | MEM, OFF);
    b.op(LD | H | IND, 2);
    b.jump(JMP | JEQ | K, 0, To::On, To::Keep);
    b.le16(0);
    b.op(ST, MSG);
    b.jump(JMP | JGE | K, NLMSG_HDRLEN, To::On, To::Keep);
    // Longer than what is left: keep.
    b.op(LD | MEM, PKT);
    b.op(LDX | MEM, OFF);
    b.op(ALU | SUB | X, 0);
    b.op(MISC | TAX, 0);
    b.op(LD | MEM, MSG);
    b.jump(JMP | JGT | X, 0, To::Keep, To::On);
    // The next message: OFF + align(len), at most the datagram's end.
    b.op(ALU | ADD | K, 3);
    b.op(ALU | AND | K, !3);
    b.op(LDX | MEM, OFF);
    b.op(ALU | ADD | X, 0);
    b.op(ST, NEXT);
    b.op(LDX | MEM, PKT);
    let fits = b.here() + 3;
    b.jump(JMP | JGT | X, 0, To::On, To::At(fits));
    b.op(MISC | TXA, 0);
    b.op(ST, NEXT);
    // Another subsystem, or a generation message: skipped, as userspace does.
    b.op(LDX | MEM, OFF);
    b.op(LD | B | IND, 5);
    b.jump(JMP | JEQ | K, NFNL_SUBSYS_NFTABLES, To::On, To::Skip);
    b.op(LD | B | IND, 4);
    b.jump(JMP | JEQ | K, NFT_MSG_NEWGEN, To::Skip, To::On);
    b.jump(JMP | JEQ | K, NFT_MSG_GETGEN, To::Skip, To::On);
    // Room for the nfgenmsg and one attribute header, else keep.
    b.op(LD | MEM, MSG);
    b.jump(JMP | JGE | K, ATTRS + 4, To::On, To::Keep);
    // The first attribute must be the table name (type 1, flags aside).
    b.op(LD | B | IND, ATTRS + 2);
    b.jump(JMP | JEQ | K, 1, To::On, To::Keep);
    b.op(LD | B | IND, ATTRS + 3);
    b.op(ALU | AND | K, 0x3f);
    b.jump(JMP | JEQ | K, 0, To::On, To::Keep);
    // Its length: at least a header, within the message.
    b.le16(ATTRS);
    b.op(ST, ATTR);
    b.jump(JMP | JGE | K, 4, To::On, To::Keep);
    b.op(LD | MEM, MSG);
    b.op(ALU | SUB | K, ATTRS);
    b.op(MISC | TAX, 0);
    b.op(LD | MEM, ATTR);
    b.jump(JMP | JGT | X, 0, To::Keep, To::On);
    // A value that starts with a watched name: keep. (Its bytes are within the message,
    // so within the datagram: the length was checked first.)
    for name in names {
        let chunks = chunks(name);
        // ld, jge, ldx, a load and a jump per chunk, the jump to keep.
        let next_name = To::At(b.here() + 4 + 2 * chunks.len());
        b.op(LD | MEM, ATTR);
        b.jump(JMP | JGE | K, 4 + name.len() as u32, To::On, next_name);
        b.op(LDX | MEM, OFF);
        for (size, at, value) in chunks {
            b.op(LD | size | IND, ATTRS + 4 + at);
            b.jump(JMP | JEQ | K, value, To::On, next_name);
        }
        b.jump(JMP | JEQ | K, 0, To::Keep, To::Keep);
    }
    // No watched name: this message is not ours.
    b.jump(JMP | JEQ | K, 0, To::Skip, To::Skip);
    b.finish()
}

/// `name` as big-endian loads: (size, offset, value).
fn chunks(name: &[u8]) -> Vec<(u16, u32, u32)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < name.len() {
        let left = name.len() - at;
        let (size, n) = match left {
            4.. => (W, 4),
            2 | 3 => (H, 2),
            _ => (B, 1),
        };
        let value = name[at..at + n]
            .iter()
            .fold(0u32, |v, b| (v << 8) | u32::from(*b));
        out.push((size, at as u32, value));
        at += n;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::tests::message;
    use super::super::{touches, NFPROTO_INET, NFPROTO_IPV4, NFPROTO_IPV6};
    use super::*;

    /// Runs `p` over `packet` as the kernel's classic BPF interpreter does: a load out of
    /// bounds returns 0 (drop). Panics on an instruction the program should not hold.
    fn run(p: &Program, packet: &[u8]) -> u32 {
        let (mut a, mut x, mut m) = (0u32, 0u32, [0u32; 16]);
        let load = |at: u32, size: u16| -> Option<u32> {
            let n = match size {
                W => 4,
                H => 2,
                B => 1,
                s => panic!("size {s:#x}"),
            };
            let at = at as usize;
            let bytes = packet.get(at..at.checked_add(n)?)?;
            Some(bytes.iter().fold(0, |v, b| (v << 8) | u32::from(*b)))
        };
        let mut pc = 0usize;
        loop {
            let i = p.0[pc];
            pc += 1;
            let (size, mode) = (i.code & 0x18, i.code & 0xe0);
            match i.code & 0x07 {
                LD => {
                    a = match mode {
                        IMM => i.k,
                        MEM => m[i.k as usize],
                        LEN => packet.len() as u32,
                        ABS => match load(i.k, size) {
                            Some(v) => v,
                            None => return 0,
                        },
                        IND => match load(x.wrapping_add(i.k), size) {
                            Some(v) => v,
                            None => return 0,
                        },
                        m => panic!("ld mode {m:#x}"),
                    }
                }
                LDX => {
                    x = match mode {
                        IMM => i.k,
                        MEM => m[i.k as usize],
                        LEN => packet.len() as u32,
                        m => panic!("ldx mode {m:#x}"),
                    }
                }
                ST => m[i.k as usize] = a,
                0x03 => m[i.k as usize] = x,
                ALU => {
                    let v = if i.code & X != 0 { x } else { i.k };
                    a = match i.code & 0xf0 {
                        ADD => a.wrapping_add(v),
                        SUB => a.wrapping_sub(v),
                        OR => a | v,
                        AND => a & v,
                        LSH => a.checked_shl(v).unwrap_or(0),
                        op => panic!("alu {op:#x}"),
                    }
                }
                JMP => {
                    let v = if i.code & X != 0 { x } else { i.k };
                    let taken = match i.code & 0xf0 {
                        JA => {
                            pc += i.k as usize;
                            continue;
                        }
                        JEQ => a == v,
                        JGT => a > v,
                        JGE => a >= v,
                        op => panic!("jmp {op:#x}"),
                    };
                    pc += usize::from(if taken { i.jt } else { i.jf });
                }
                RET => return i.k,
                MISC => {
                    if i.code & 0xf8 == TXA {
                        a = x
                    } else {
                        x = a
                    }
                }
                c => panic!("class {c:#x}"),
            }
        }
    }

    /// What the kernel checks before it takes a program (`bpf_check_classic`): every
    /// jump lands inside it, it ends with a return, scratch slots exist and are written
    /// before they are read on every path (`check_load_and_stores`).
    fn kernel_accepts(p: &Program) -> Result<(), String> {
        let n = p.0.len();
        if n == 0 || n > MAX_INSNS {
            return Err(format!("{n} instructions"));
        }
        if p.0[n - 1].code & 0x07 != RET {
            return Err("does not end with a return".into());
        }
        let mut masks = vec![u16::MAX; n];
        let mut valid: u16 = 0;
        for (pc, i) in p.0.iter().enumerate() {
            valid &= masks[pc];
            let target = |off: usize| -> Result<usize, String> {
                let t = pc + 1 + off;
                if t < n {
                    Ok(t)
                } else {
                    Err(format!("jump at {pc} lands at {t}, past {n}"))
                }
            };
            match i.code {
                // ST, STX, LD MEM, LDX MEM
                0x02 | 0x03 | 0x60 | 0x61 if i.k >= 16 => {
                    return Err(format!("slot {} at {pc}", i.k))
                }
                0x02 | 0x03 => valid |= 1 << i.k,
                0x60 | 0x61 if valid & (1 << i.k) == 0 => {
                    return Err(format!("slot {} read at {pc} before it is written", i.k));
                }
                c if c == JMP | JA => {
                    masks[target(i.k as usize)?] &= valid;
                    valid = u16::MAX;
                }
                c if c & 0x07 == JMP => {
                    masks[target(usize::from(i.jt))?] &= valid;
                    masks[target(usize::from(i.jf))?] &= valid;
                    valid = u16::MAX;
                }
                _ => {}
            }
        }
        Ok(())
    }

    #[test]
    fn the_kernel_takes_the_program() {
        for watched in [IPTABLES, NFTABLES] {
            let p = program(&names(watched), MESSAGES);
            assert_eq!(kernel_accepts(&p), Ok(()), "{watched:?}");
        }
        assert_eq!(kernel_accepts(&program(&[""], MESSAGES)), Ok(()));
        // And the kernel itself (attaching a filter needs no privilege), at the size the
        // daemon ends up with.
        for watched in [IPTABLES, NFTABLES] {
            let socket =
                netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_NETFILTER).unwrap();
            let messages = super::super::attach(&socket, &names(watched)).unwrap();
            assert!(messages >= 4, "{messages}");
        }
    }

    /// xorshift64*: the datagrams are the same on every run.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn pick<'a, T>(&mut self, from: &'a [T]) -> &'a T {
            &from[self.below(from.len())]
        }
    }

    const TABLES: &[&[u8]] = &[
        b"raw",
        b"filter",
        b"nat",
        b"mangle",
        b"security",
        b"localdns",
        b"kube-proxy",
        b"ra",
        b"rawx",
        b"filte",
        b"filters",
        b"localdn",
        b"",
        b"r",
    ];

    /// One notification the way the kernel writes them, or slightly off.
    fn one(rng: &mut Rng) -> (Vec<u8>, bool) {
        let families = [NFPROTO_IPV4, NFPROTO_IPV6, NFPROTO_INET, 0, 7];
        let family = *rng.pick(&families);
        let kind = rng.below(26) as u16;
        let table = *rng.pick(TABLES);
        let mut name = table.to_vec();
        // Mostly NUL-terminated, as the kernel sends them.
        if rng.below(8) != 0 {
            name.push(0);
        }
        if rng.below(10) == 0 {
            name.extend_from_slice(b"tail\0");
        }
        let flags = *rng.pick(&[0u16, 0, 0, 0x4000, 0x8000]);
        let rule_attrs: Vec<u8> = (0..rng.below(300)).map(|_| rng.next() as u8).collect();
        let mut attrs: Vec<(u16, &[u8])> = Vec::new();
        let name_first = rng.below(10) != 0;
        if !name_first {
            attrs.push((2, b"KUBE-SERVICES\0"));
        }
        attrs.push((1 | flags, &name));
        attrs.push((4, &rule_attrs));
        if rng.below(30) == 0 {
            attrs.clear();
        }
        let mut m = message(kind, family, &attrs);
        // Another subsystem now and then.
        if rng.below(15) == 0 {
            m[5] = *rng.pick(&[0u8, 1, 12, 255]);
        }
        // The name as the kernel writes it, not longer than a watched one it starts with.
        let exact =
            name.len() == table.len() + 1 && ![b"rawx".as_slice(), b"filters"].contains(&table);
        let plain = exact
            && name_first
            && flags & 0x3fff == 0
            && !attrs.is_empty()
            && m[5] == 10
            && [NFPROTO_IPV4, NFPROTO_IPV6].contains(&family);
        (m, plain)
    }

    fn datagram(rng: &mut Rng) -> Vec<u8> {
        // Mostly a few messages, sometimes more than the program unrolls.
        let n = 1 + match rng.below(4) {
            0 => rng.below(MESSAGES + 8),
            _ => rng.below(4),
        };
        let mut d = Vec::new();
        for _ in 0..n {
            d.extend(one(rng).0);
        }
        match rng.below(12) {
            0 => d.truncate(rng.below(d.len() + 1)),
            1 => {
                let at = rng.below(d.len());
                d[at] = rng.next() as u8;
            }
            2 => d.extend((0..rng.below(20)).map(|_| rng.next() as u8)),
            _ => {}
        }
        d
    }

    const IPTABLES: &[(u8, &str)] = &[
        (NFPROTO_IPV4, "raw"),
        (NFPROTO_IPV6, "raw"),
        (NFPROTO_IPV4, "filter"),
        (NFPROTO_IPV6, "filter"),
    ];
    const NFTABLES: &[(u8, &str)] = &[(NFPROTO_INET, "localdns")];

    fn names(watched: &[(u8, &'static str)]) -> Vec<&'static str> {
        watched.iter().map(|(_, t)| *t).collect()
    }

    #[test]
    fn the_program_fits_and_keeps_every_datagram_userspace_would_count() {
        for watched in [IPTABLES, NFTABLES] {
            let p = program(&names(watched), MESSAGES);
            assert!(p.0.len() <= MAX_INSNS, "{} instructions", p.0.len());
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
            let (mut counted, mut dropped) = (0, 0);
            for _ in 0..4000 {
                let d = datagram(&mut rng);
                let keep = run(&p, &d) != 0;
                if touches(&d, watched) {
                    counted += 1;
                    assert!(keep, "dropped a datagram userspace counts: {d:02x?}");
                } else if !keep {
                    dropped += 1;
                }
            }
            // Both kinds occur, and the filter does drop.
            assert!(counted > 1000, "{counted} {dropped} {watched:?}");
            assert!(dropped > 300, "{dropped}");
        }
    }

    #[test]
    fn plain_datagrams_are_decided_as_userspace_decides() {
        // Well-formed, the table name first and NUL-terminated, not longer than a watched
        // name it starts with, in an iptables family: the kernel's decision is userspace's.
        let watched = IPTABLES;
        let p = program(&names(watched), MESSAGES);
        let mut rng = Rng(7);
        let mut both = [0usize; 2];
        for _ in 0..20000 {
            let mut d = Vec::new();
            let mut plain = true;
            for _ in 0..1 + rng.below(3) {
                let (m, ok) = one(&mut rng);
                plain &= ok;
                d.extend(m);
            }
            if !plain {
                continue;
            }
            let user = touches(&d, watched);
            assert_eq!(run(&p, &d) != 0, user, "{d:02x?}");
            both[usize::from(user)] += 1;
        }
        assert!(both[0] > 50 && both[1] > 50, "{both:?}");
    }

    #[test]
    fn kube_proxys_nat_rewrite_is_dropped_and_a_raw_change_kept() {
        let p = program(&names(IPTABLES), MESSAGES);
        let rule = |family, table: &[u8]| {
            message(
                6, // NFT_MSG_NEWRULE
                family,
                &[(1, table), (2, b"KUBE-SERVICES\0"), (4, &[0x5a; 240])],
            )
        };
        let nat: Vec<u8> = (0..12).flat_map(|_| rule(NFPROTO_IPV4, b"nat\0")).collect();
        let gen = message(16, 0, &[(1, &[0, 0, 0, 9])]);
        assert_eq!(run(&p, &[nat.clone(), gen.clone()].concat()), DROP);
        assert_eq!(run(&p, &gen), DROP);
        // One raw rule among them: kept.
        let raw = [nat.clone(), rule(NFPROTO_IPV6, b"raw\0"), gen].concat();
        assert_eq!(run(&p, &raw), KEEP);
        assert_eq!(run(&p, &rule(NFPROTO_IPV4, b"filter\0")), KEEP);
        // Not understood: kept.
        assert_eq!(run(&p, &nat[..nat.len() - 1]), KEEP);
        assert_eq!(run(&program(&[""], MESSAGES), &nat), KEEP);
    }
}
