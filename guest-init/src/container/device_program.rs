//! The container's device rules as a cgroup device program: eBPF
//! instructions, assembled by hand, that the kernel runs on every open of
//! a device node and every mknod by a process of the container's cgroup,
//! returning 1 to allow it and 0 to refuse it (EPERM).
//!
//! The rules ([`krun_proto::DeviceRule`]) are read from the last one back,
//! and the first that matches decides; an unmatched request is allowed
//! (the tests hold the program to a plain `decide` function that says
//! this). The program is that loop unrolled, one block per rule:
//!
//! ```text
//!     w2 = ctx->access_type; w2 &= 0xffff    // device type
//!     w3 = ctx->access_type; w3 >>= 16       // access asked for
//!     w4 = ctx->major; w5 = ctx->minor
//! rule n-1:
//!     if w2 != TYPE goto rule n-2            // (not for type a)
//!     w1 = w3; w1 &= ACCESS
//!     if w1 != w3 goto rule n-2              // allow: all of it covered
//!     if w1 == 0 goto rule n-2               // deny: any of it shared
//!     if w4 != MAJOR goto rule n-2           // (not for any major)
//!     if w5 != MINOR goto rule n-2           // (not for any minor)
//!     r0 = ALLOW; exit
//! rule n-2: ...
//!     r0 = 1; exit
//! ```
//!
//! A type `a` rule matches everything: it is the last block, and the rules
//! before it are left out (the verifier refuses code it cannot reach).
//! Comparisons are 32-bit (BPF_JMP32), so any u32 number compares right.
//! Pure: loading and attaching are [`crate::sys`]'s.

use krun_proto::{DeviceRule, DeviceType};

/// The kernel's `bpf_cgroup_dev_ctx.access_type` bits: the type in the
/// low 16 bits, the access in the high 16.
pub const DEV_BLOCK: u32 = 1;
pub const DEV_CHAR: u32 = 2;
pub const ACC_MKNOD: u32 = 1;
pub const ACC_READ: u32 = 2;
pub const ACC_WRITE: u32 = 4;

/// A rule with its access as the kernel's bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rule {
    pub allow: bool,
    /// None: type `a`, every device.
    pub dev_type: Option<u32>,
    pub major: Option<u32>,
    pub minor: Option<u32>,
    pub access: u32,
}

/// The rules as the program takes them, or what is wrong with one.
pub fn rules(given: &[DeviceRule]) -> Result<Vec<Rule>, String> {
    given
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let access = r.access.chars().try_fold(0, |bits, c| match c {
                'r' => Ok(bits | ACC_READ),
                'w' => Ok(bits | ACC_WRITE),
                'm' => Ok(bits | ACC_MKNOD),
                _ => Err(format!(
                    "device rule {i}: access {:?} is not a subset of \"rwm\"",
                    r.access
                )),
            })?;
            Ok(Rule {
                allow: r.allow,
                dev_type: match r.kind {
                    DeviceType::All => None,
                    DeviceType::Char => Some(DEV_CHAR),
                    DeviceType::Block => Some(DEV_BLOCK),
                },
                major: r.major,
                minor: r.minor,
                access,
            })
        })
        .collect()
}

/// One request: the device's type, the access asked for (the kernel's
/// bits) and the device's numbers.
#[cfg(test)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub dev_type: u32,
    pub access: u32,
    pub major: u32,
    pub minor: u32,
}

#[cfg(test)]
fn matches(r: &Rule, q: &Request) -> bool {
    let Some(t) = r.dev_type else {
        return true;
    };
    let access = if r.allow {
        q.access & r.access == q.access
    } else {
        q.access & r.access != 0
    };
    t == q.dev_type
        && access
        && r.major.is_none_or(|m| m == q.major)
        && r.minor.is_none_or(|m| m == q.minor)
}

/// What the program answers to `q`: the last matching rule's word, or
/// allowed when none matches. The reference the program is tested
/// against.
#[cfg(test)]
pub fn decide(rules: &[Rule], q: &Request) -> bool {
    rules
        .iter()
        .rev()
        .find(|r| matches(r, q))
        .is_none_or(|r| r.allow)
}

/// One eBPF instruction (`struct bpf_insn`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Insn {
    pub code: u8,
    pub dst: u8,
    pub src: u8,
    pub off: i16,
    pub imm: i32,
}

impl Insn {
    /// The 8 bytes the kernel reads.
    pub fn encode(&self) -> [u8; 8] {
        let mut b = [0; 8];
        b[0] = self.code;
        b[1] = (self.src << 4) | (self.dst & 0x0f);
        b[2..4].copy_from_slice(&self.off.to_le_bytes());
        b[4..8].copy_from_slice(&self.imm.to_le_bytes());
        b
    }
}

/// The opcodes used (class | operation | source).
pub mod op {
    /// r_dst = *(u32 *)(r_src + off)
    pub const LDX_W: u8 = 0x01 | 0x60;
    /// w_dst &= imm
    pub const AND32_K: u8 = 0x04 | 0x50;
    /// w_dst >>= imm
    pub const RSH32_K: u8 = 0x04 | 0x70;
    /// w_dst = w_src
    pub const MOV32_X: u8 = 0x04 | 0xb0 | 0x08;
    /// r_dst = imm
    pub const MOV64_K: u8 = 0x07 | 0xb0;
    /// if w_dst != imm goto +off
    pub const JNE32_K: u8 = 0x06 | 0x50;
    /// if w_dst != w_src goto +off
    pub const JNE32_X: u8 = 0x06 | 0x50 | 0x08;
    /// if w_dst == imm goto +off
    pub const JEQ32_K: u8 = 0x06 | 0x10;
    pub const EXIT: u8 = 0x05 | 0x90;
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        dst,
        src,
        off,
        imm,
    }
}

/// The program's first instructions: the request into w2..w5 (r1 is the
/// context).
const PROLOGUE: [Insn; 6] = [
    insn(op::LDX_W, 2, 1, 0, 0),
    insn(op::AND32_K, 2, 0, 0, 0xffff),
    insn(op::LDX_W, 3, 1, 0, 0),
    insn(op::RSH32_K, 3, 0, 0, 16),
    insn(op::LDX_W, 4, 1, 4, 0),
    insn(op::LDX_W, 5, 1, 8, 0),
];

/// The block of `r`, its jumps left at 0: the index of each jump to patch
/// to the block's end, then the instructions.
fn block(r: &Rule) -> (Vec<usize>, Vec<Insn>) {
    let mut out = Vec::new();
    let mut jumps = Vec::new();
    if let Some(t) = r.dev_type {
        jumps.push(out.len());
        out.push(insn(op::JNE32_K, 2, 0, 0, t as i32));
        out.push(insn(op::MOV32_X, 1, 3, 0, 0));
        out.push(insn(op::AND32_K, 1, 0, 0, r.access as i32));
        jumps.push(out.len());
        if r.allow {
            out.push(insn(op::JNE32_X, 1, 3, 0, 0));
        } else {
            out.push(insn(op::JEQ32_K, 1, 0, 0, 0));
        }
        for (reg, n) in [(4, r.major), (5, r.minor)] {
            if let Some(n) = n {
                jumps.push(out.len());
                // The same 32 bits, compared as 32 bits.
                out.push(insn(op::JNE32_K, reg, 0, 0, n as i32));
            }
        }
    }
    out.push(insn(op::MOV64_K, 0, 0, 0, i32::from(r.allow)));
    out.push(insn(op::EXIT, 0, 0, 0, 0));
    (jumps, out)
}

/// The program for `rules`.
pub fn program(rules: &[Rule]) -> Vec<Insn> {
    let mut prog = PROLOGUE.to_vec();
    for r in rules.iter().rev() {
        let (jumps, mut insns) = block(r);
        let len = insns.len();
        for j in jumps {
            // To the first instruction after the block; a block holds at
            // most 8 instructions.
            insns[j].off = (len - j - 1) as i16;
        }
        prog.extend(insns);
        if r.dev_type.is_none() {
            return prog;
        }
    }
    prog.push(insn(op::MOV64_K, 0, 0, 0, 1));
    prog.push(insn(op::EXIT, 0, 0, 0, 0));
    prog
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `prog` as the kernel would on `q`, for the instructions
    /// [`program`] emits; panics on anything the verifier would refuse
    /// that it can see (a jump or a fall out of the program, another
    /// opcode, an uninitialised r0, a read outside the context).
    fn run(prog: &[Insn], q: &Request) -> u64 {
        let ctx = [q.dev_type | (q.access << 16), q.major, q.minor];
        let mut reg = [None::<u64>; 11];
        reg[1] = Some(0);
        let mut pc = 0usize;
        let mut steps = 0;
        loop {
            steps += 1;
            assert!(steps < 10_000, "a loop");
            let i = prog.get(pc).expect("ran off the program");
            let d = usize::from(i.dst);
            let s = usize::from(i.src);
            let w = |r: Option<u64>| r.expect("read of an unset register") as u32;
            let mut next = pc + 1;
            match i.code {
                op::LDX_W => {
                    assert_eq!((s, reg[s]), (1, Some(0)), "load from the context");
                    let at = usize::try_from(i.off).unwrap();
                    assert_eq!(at % 4, 0);
                    reg[d] = Some(u64::from(ctx[at / 4]));
                }
                op::AND32_K => reg[d] = Some(u64::from(w(reg[d]) & i.imm as u32)),
                op::RSH32_K => reg[d] = Some(u64::from(w(reg[d]) >> i.imm)),
                op::MOV32_X => reg[d] = Some(u64::from(w(reg[s]))),
                op::MOV64_K => reg[d] = Some(i.imm as i64 as u64),
                op::JNE32_K | op::JNE32_X | op::JEQ32_K => {
                    let right = if i.code == op::JNE32_X {
                        w(reg[s])
                    } else {
                        i.imm as u32
                    };
                    let equal = w(reg[d]) == right;
                    if equal == (i.code == op::JEQ32_K) {
                        next = usize::try_from(pc as i64 + 1 + i64::from(i.off)).unwrap();
                    }
                }
                op::EXIT => return reg[0].expect("r0 unset at exit"),
                other => panic!("opcode {other:#x}"),
            }
            pc = next;
        }
    }

    /// Every instruction is reached by some path (the verifier refuses
    /// unreachable code), and the program ends in exit.
    fn all_reachable(prog: &[Insn]) {
        let mut seen = vec![false; prog.len()];
        let mut todo = vec![0usize];
        while let Some(pc) = todo.pop() {
            if pc >= prog.len() || std::mem::replace(&mut seen[pc], true) {
                assert!(pc < prog.len(), "jump out of the program");
                continue;
            }
            let i = prog[pc];
            if i.code == op::EXIT {
                continue;
            }
            todo.push(pc + 1);
            if i.code & 0x07 == 0x06 {
                todo.push((pc as i64 + 1 + i64::from(i.off)) as usize);
            }
        }
        assert!(seen.iter().all(|s| *s), "unreachable code: {seen:?}");
        assert_eq!(prog.last().unwrap().code, op::EXIT);
    }

    fn r(
        allow: bool,
        kind: DeviceType,
        major: Option<u32>,
        minor: Option<u32>,
        access: &str,
    ) -> DeviceRule {
        DeviceRule {
            allow,
            kind,
            major,
            minor,
            access: access.into(),
        }
    }

    use DeviceType::{All, Block, Char};

    /// podman's: deny everything, allow the defaults, mknod of anything.
    fn podman_like() -> Vec<DeviceRule> {
        vec![
            r(false, All, None, None, "rwm"),
            r(true, Char, None, None, "m"),
            r(true, Block, None, None, "m"),
            r(true, Char, Some(1), Some(3), "rwm"),
            r(true, Char, Some(136), None, "rwm"),
        ]
    }

    fn q(dev_type: u32, access: u32, major: u32, minor: u32) -> Request {
        Request {
            dev_type,
            access,
            major,
            minor,
        }
    }

    #[test]
    fn the_rules_decide_as_runc_does() {
        let rules = rules(&podman_like()).unwrap();
        let rw = ACC_READ | ACC_WRITE;
        assert!(decide(&rules, &q(DEV_CHAR, rw, 1, 3)));
        assert!(decide(&rules, &q(DEV_CHAR, ACC_READ, 136, 7)));
        assert!(decide(&rules, &q(DEV_BLOCK, ACC_MKNOD, 7, 0)));
        assert!(!decide(&rules, &q(DEV_BLOCK, ACC_READ, 7, 0)));
        assert!(!decide(&rules, &q(DEV_CHAR, rw, 10, 200)));
        assert!(!decide(&rules, &q(DEV_CHAR, ACC_MKNOD | ACC_READ, 10, 200)));
        // A deny rule refuses a request that shares any access with it.
        let deny_w = rules_of(&[r(false, Char, Some(1), Some(3), "w")]);
        assert!(!decide(&deny_w, &q(DEV_CHAR, rw, 1, 3)));
        assert!(decide(&deny_w, &q(DEV_CHAR, ACC_READ, 1, 3)));
        assert!(decide(&[], &q(DEV_BLOCK, rw, 8, 0)));
    }

    fn rules_of(given: &[DeviceRule]) -> Vec<Rule> {
        rules(given).unwrap()
    }

    #[test]
    fn access_letters_other_than_rwm_are_refused() {
        let e = rules(&[r(true, Char, None, None, "rx")]).unwrap_err();
        assert_eq!(e, "device rule 0: access \"rx\" is not a subset of \"rwm\"");
    }

    #[test]
    fn instructions_encode_as_the_kernel_reads_them() {
        let i = insn(op::JNE32_K, 4, 0, 3, -2);
        assert_eq!(i.encode(), [0x56, 0x04, 3, 0, 0xfe, 0xff, 0xff, 0xff]);
        assert_eq!(
            insn(op::LDX_W, 5, 1, 8, 0).encode(),
            [0x61, 0x15, 8, 0, 0, 0, 0, 0]
        );
        assert_eq!(insn(op::MOV32_X, 1, 3, 0, 0).encode()[..2], [0xbc, 0x31]);
        assert_eq!(insn(op::JNE32_X, 1, 3, 0, 0).encode()[0], 0x5e);
        assert_eq!(insn(op::JEQ32_K, 1, 0, 0, 0).encode()[0], 0x16);
        assert_eq!(
            insn(op::MOV64_K, 0, 0, 0, 1).encode(),
            [0xb7, 0, 0, 0, 1, 0, 0, 0]
        );
        assert_eq!(insn(op::AND32_K, 2, 0, 0, 0xffff).encode()[0], 0x54);
        assert_eq!(insn(op::RSH32_K, 3, 0, 0, 16).encode()[0], 0x74);
        assert_eq!(insn(op::EXIT, 0, 0, 0, 0).encode()[0], 0x95);
        // One allow rule for c 1:3 rw, whole.
        let p = program(&rules_of(&[r(true, Char, Some(1), Some(3), "rw")]));
        let body: Vec<_> = p[PROLOGUE.len()..].to_vec();
        assert_eq!(
            body,
            [
                insn(op::JNE32_K, 2, 0, 7, DEV_CHAR as i32),
                insn(op::MOV32_X, 1, 3, 0, 0),
                insn(op::AND32_K, 1, 0, 0, (ACC_READ | ACC_WRITE) as i32),
                insn(op::JNE32_X, 1, 3, 4, 0),
                insn(op::JNE32_K, 4, 0, 3, 1),
                insn(op::JNE32_K, 5, 0, 2, 3),
                insn(op::MOV64_K, 0, 0, 0, 1),
                insn(op::EXIT, 0, 0, 0, 0),
                insn(op::MOV64_K, 0, 0, 0, 1),
                insn(op::EXIT, 0, 0, 0, 0),
            ]
        );
    }

    /// Requests over the numbers and types the rules use, and others.
    fn requests() -> Vec<Request> {
        let mut out = Vec::new();
        for dev_type in [DEV_BLOCK, DEV_CHAR, 3] {
            for access in 0..8 {
                for major in [0, 1, 5, 7, 10, 136, u32::MAX] {
                    for minor in [0, 2, 3, 200, 1 << 31, u32::MAX] {
                        out.push(q(dev_type, access, major, minor));
                    }
                }
            }
        }
        out
    }

    fn check(given: &[DeviceRule]) {
        let rules = rules_of(given);
        let prog = program(&rules);
        all_reachable(&prog);
        for q in requests() {
            let want = u64::from(decide(&rules, &q));
            assert_eq!(run(&prog, &q), want, "{q:?} under {given:?}");
        }
    }

    #[test]
    fn the_program_decides_as_the_rules_do() {
        check(&[]);
        check(&podman_like());
        check(&[r(false, All, None, None, "rwm")]);
        check(&[
            r(true, Char, Some(1), None, "rwm"),
            r(false, All, Some(9), Some(9), "r"),
            r(true, Block, Some(7), Some(0), "rw"),
        ]);
        check(&[
            r(false, Char, Some(10), Some(200), "rw"),
            r(false, Block, None, Some(1 << 31), "m"),
            r(true, Char, Some(u32::MAX), Some(u32::MAX), ""),
        ]);
        // Rules drawn at random from the same pieces.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let numbers = [None, Some(0), Some(1), Some(3), Some(7), Some(u32::MAX)];
        for _ in 0..60 {
            let len = next(6) as usize;
            let given: Vec<_> = (0..len)
                .map(|_| {
                    let kind = [All, Char, Block][next(3) as usize];
                    let access = ["", "r", "w", "m", "rw", "rm", "wm", "rwm"][next(8) as usize];
                    let major = numbers[next(6) as usize];
                    let minor = numbers[next(6) as usize];
                    r(next(2) == 1, kind, major, minor, access)
                })
                .collect();
            check(&given);
        }
    }
}
