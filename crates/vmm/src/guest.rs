//! The guest programs and the memory layout they run in.
//!
//! Guests are assembled at run time from the Rust source below (iced-x86's
//! code assembler), so nothing is built by hand and no binary is committed.
//! KVM on this project's machines runs CPL0 code through an emulator and
//! CPL3 code natively, so the VMM starts every vCPU directly in 64-bit long
//! mode with identity paging ([`boot_sregs`]), a six-instruction CPL0 stub
//! `iretq`s to CPL3 with IOPL 3, and the real work runs in user mode, where
//! it talks to the VMM through MMIO (CPL0 code may also use port I/O).
//!
//! # Guest physical layout
//! | address | what |
//! |---|---|
//! | 0x1000 | PML4 |
//! | 0x2000 | PDPT |
//! | 0x3000..0x7000 | 4 page directories: 4 GiB identity-mapped with 2 MiB pages, user-accessible |
//! | 0x8000 | GDT: null, kernel code/data, user data/code, TSS |
//! | 0x8800 | TSS |
//! | 0x9000 | mailboxes, 64 bytes per vCPU ([`Mailbox`]) |
//! | 0x10000 | code: the CPL0 stub, then the user program |
//! | 0x40000..0x80000 | kernel stacks, 4 KiB per vCPU |
//! | 0x80000..0xc0000 | user stacks, 4 KiB per vCPU |
//! | 0x200000.. | the workload's data, then the shared block at the top |
//!
//! # The walker
//! Each vCPU owns a slice of the data area. It first fills every touched page
//! of its slice (every page for [`WorkloadKind::Walker`], every tenth for
//! [`WorkloadKind::Sparse`]) with `value(addr) = (addr ^ seed) * M`, reports
//! pass 0, then loops forever: pass `g` reads each word, checks that it holds
//! `value(addr) + g - 1`, adds it to a running sum, and rewrites it as
//! `value(addr) + g`; then it reads the shared block (which every vCPU reads,
//! and nobody writes, so vCPUs fault on the same pages at once), checking
//! each word against `value(addr)`. At the end of the pass it stores the
//! pass number and sum in its mailbox and writes its vCPU id to
//! [`MMIO_REPORT`]. Any wrong word bumps the mailbox's mismatch count and
//! records the first bad address. The VMM recomputes each pass's sum
//! independently ([`VcpuPlan::expected_sum`]).

use iced_x86::code_asm::*;
use iced_x86::BlockEncoderOptions;
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::memory::{GuestMemory, HUGE_PAGE, PAGE};

pub const PML4: u64 = 0x1000;
pub const PDPT: u64 = 0x2000;
pub const PD: u64 = 0x3000;
pub const GDT: u64 = 0x8000;
pub const TSS: u64 = 0x8800;
pub const MAILBOX: u64 = 0x9000;
pub const MAILBOX_SIZE: u64 = 64;
pub const CODE: u64 = 0x10000;
pub const KSTACK_TOP: u64 = 0x80000;
pub const USTACK_TOP: u64 = 0xc0000;
pub const DATA_START: u64 = 0x20_0000;
/// At most this many vCPUs (mailboxes and stacks).
pub const MAX_VCPUS: u32 = 64;

/// Console: one byte per `out` (CPL0 code).
pub const PORT_CONSOLE: u16 = 0x3f8;
/// A vCPU finished a pass: a 32-bit write of its vCPU id here; the mailbox
/// holds the rest. This is MMIO (an address with no memory behind it, which
/// exits to the VMM) rather than port I/O because on this project's KVM
/// (PVM) user-mode code runs natively and `out` at CPL3 faults even with
/// IOPL 3.
pub const MMIO_REPORT: u64 = 0xf000_0000;
/// Console for CPL3 code: one byte per write.
pub const MMIO_CONSOLE: u64 = 0xf000_1000;

/// The walker's multiplier (2^64 / golden ratio).
pub const MULT: u64 = 0x9e37_79b9_7f4a_7c15;

pub const SEL_KCODE: u16 = 0x08;
pub const SEL_KDATA: u16 = 0x10;
pub const SEL_UDATA: u16 = 0x18 | 3;
pub const SEL_UCODE: u16 = 0x20 | 3;
pub const SEL_TSS: u16 = 0x28;

/// Offsets in a vCPU's mailbox (all u64).
pub struct Mailbox;
impl Mailbox {
    pub const PASS: u64 = 8;
    pub const SUM: u64 = 16;
    pub const MISMATCHES: u64 = 24;
    pub const FIRST_BAD: u64 = 32;

    pub fn addr(vcpu: u32) -> u64 {
        MAILBOX + u64::from(vcpu) * MAILBOX_SIZE
    }
}

/// The word the walker writes at `addr` before its first pass.
pub fn value(addr: u64, seed: u64) -> u64 {
    (addr ^ seed).wrapping_mul(MULT)
}

/// What the guest does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkloadKind {
    /// Fill all of memory, then keep re-reading and rewriting it.
    Walker,
    /// Touch one page in ten (a 10% working set), fill and rewrite only those.
    Sparse,
    /// CPL0 only: print "halt\n" on the console and HLT.
    Halt,
}

impl WorkloadKind {
    pub fn parse(s: &str) -> Option<WorkloadKind> {
        match s {
            "walker" => Some(WorkloadKind::Walker),
            "sparse" => Some(WorkloadKind::Sparse),
            "halt" => Some(WorkloadKind::Halt),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            WorkloadKind::Walker => "walker",
            WorkloadKind::Sparse => "sparse",
            WorkloadKind::Halt => "halt",
        }
    }
}

/// The guest's program and its parameters; saved in the state file so a
/// restored VM can check the guest's reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    pub kind: WorkloadKind,
    pub seed: u64,
    /// Bytes at the top of memory that every vCPU reads each pass (a
    /// multiple of 4 KiB; 0 for none).
    pub shared_bytes: u64,
}

impl Workload {
    pub fn new(kind: WorkloadKind, seed: u64) -> Workload {
        Workload {
            kind,
            seed,
            shared_bytes: 0,
        }
    }

    fn stride(&self) -> u64 {
        match self.kind {
            WorkloadKind::Sparse => 10 * PAGE,
            WorkloadKind::Walker | WorkloadKind::Halt => PAGE,
        }
    }

    /// What each of `vcpus` vCPUs works on in `mem_bytes` of memory.
    pub fn plan(&self, mem_bytes: u64, vcpus: u32) -> Result<Vec<VcpuPlan>, Error> {
        if vcpus == 0 || vcpus > MAX_VCPUS {
            return Err(Error::Config(format!(
                "{vcpus} vCPUs: between 1 and {MAX_VCPUS} are supported"
            )));
        }
        if !self.shared_bytes.is_multiple_of(PAGE) {
            return Err(Error::Config(
                "the shared block must be whole 4 KiB pages".into(),
            ));
        }
        let top = mem_bytes
            .checked_sub(self.shared_bytes)
            .filter(|t| *t > DATA_START)
            .ok_or_else(|| {
                Error::Config(format!(
                    "{} MiB of memory leaves no room for the workload (at least 4 MiB plus the shared block)",
                    mem_bytes >> 20
                ))
            })?;
        let pages = (top - DATA_START) / PAGE;
        let per = pages / u64::from(vcpus);
        if per == 0 {
            return Err(Error::Config(format!(
                "too little memory for {vcpus} vCPUs"
            )));
        }
        Ok((0..vcpus)
            .map(|id| {
                let base = DATA_START + u64::from(id) * per * PAGE;
                VcpuPlan {
                    id,
                    base,
                    end: base + per * PAGE,
                    stride: self.stride(),
                    seed: self.seed,
                    shared_base: top,
                    shared_end: top + self.shared_bytes,
                }
            })
            .collect())
    }
}

/// One vCPU's part of the workload (the walker's registers r8..r15).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VcpuPlan {
    pub id: u32,
    /// Its slice of memory, `[base, end)`.
    pub base: u64,
    pub end: u64,
    /// Distance between touched pages.
    pub stride: u64,
    pub seed: u64,
    /// The shared block, `[shared_base, shared_end)`.
    pub shared_base: u64,
    pub shared_end: u64,
}

/// Sums of a plan's words, from which every pass's checksum follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanSums {
    /// Sum of `value(addr)` over the touched words.
    own: u64,
    /// Touched words.
    words: u64,
    /// Sum of `value(addr)` over the shared block.
    shared: u64,
}

impl VcpuPlan {
    /// Pages this vCPU touches (its working set, shared block included).
    pub fn pages(&self) -> u64 {
        (self.end - self.base).div_ceil(self.stride) + (self.shared_end - self.shared_base) / PAGE
    }

    /// Computes the sums once (a pass over the plan's addresses).
    pub fn sums(&self) -> PlanSums {
        let mut own = 0u64;
        let mut words = 0u64;
        let mut page = self.base;
        while page < self.end {
            for a in (page..page + PAGE).step_by(8) {
                own = own.wrapping_add(value(a, self.seed));
            }
            words += PAGE / 8;
            page += self.stride;
        }
        let shared = (self.shared_base..self.shared_end)
            .step_by(8)
            .fold(0u64, |s, a| s.wrapping_add(value(a, self.seed)));
        PlanSums { own, words, shared }
    }

    /// The sum pass `pass` (1 or more) reports when every word was right.
    pub fn expected_sum(sums: &PlanSums, pass: u64) -> u64 {
        sums.own
            .wrapping_add(sums.words.wrapping_mul(pass.wrapping_sub(1)))
            .wrapping_add(sums.shared)
    }
}

/// The initial general registers of a vCPU: the stub's stack and the
/// walker's parameters.
pub fn boot_regs(plan: &VcpuPlan, user_entry: u64) -> kvm_bindings::kvm_regs {
    let id = u64::from(plan.id);
    kvm_bindings::kvm_regs {
        rip: CODE,
        rsp: KSTACK_TOP - id * PAGE,
        rflags: 2,
        rax: USTACK_TOP - id * PAGE,
        rbx: user_entry,
        r8: plan.base,
        r9: plan.end,
        r10: plan.stride,
        r11: plan.seed,
        r12: plan.shared_base,
        r13: plan.shared_end,
        r14: Mailbox::addr(plan.id),
        r15: id,
        ..Default::default()
    }
}

fn segment(selector: u16, type_: u8, dpl: u8, code: bool) -> kvm_bindings::kvm_segment {
    kvm_bindings::kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl,
        db: 0,
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Special registers for 64-bit long mode at CPL0 with the identity page
/// tables and GDT that [`write_boot_tables`] builds.
pub fn boot_sregs(mut s: kvm_bindings::kvm_sregs) -> kvm_bindings::kvm_sregs {
    s.cs = segment(SEL_KCODE, 0xb, 0, true);
    let data = segment(SEL_KDATA, 0x3, 0, false);
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    s.tr = kvm_bindings::kvm_segment {
        base: TSS,
        limit: 0x67,
        selector: SEL_TSS,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 0,
        s: 0,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    s.gdt.base = GDT;
    s.gdt.limit = 7 * 8 - 1;
    s.idt.base = 0;
    s.idt.limit = 0;
    s.cr3 = PML4;
    s.cr4 = 1 << 5; // PAE
    s.cr0 = (1 << 0) | (1 << 4) | (1 << 5) | (1 << 16) | (1 << 31); // PE ET NE WP PG
    s.efer = (1 << 8) | (1 << 10); // LME LMA
    s
}

/// Writes the page tables, GDT and TSS (see the module's layout table).
pub fn write_boot_tables(mem: &GuestMemory) -> Result<(), Error> {
    const P: u64 = 1;
    const RW: u64 = 2;
    const US: u64 = 4;
    const PS: u64 = 0x80;
    mem.write_u64(PML4, PDPT | P | RW | US)?;
    for i in 0..4u64 {
        mem.write_u64(PDPT + 8 * i, (PD + i * PAGE) | P | RW | US)?;
    }
    for i in 0..(4 * 512u64) {
        mem.write_u64(PD + 8 * i, (i * HUGE_PAGE) | P | RW | US | PS)?;
    }
    let gdt: [u64; 7] = [
        0,
        0x00af_9a00_0000_ffff, // kernel code: 64-bit, DPL 0
        0x00cf_9200_0000_ffff, // kernel data
        0x00cf_f200_0000_ffff, // user data, DPL 3
        0x00af_fa00_0000_ffff, // user code: 64-bit, DPL 3
        // 64-bit TSS descriptor (two slots): base TSS, limit 0x67, type 0x9.
        0x0000_8900_0000_0067 | ((TSS & 0xff_ffff) << 16) | ((TSS >> 24 & 0xff) << 56),
        TSS >> 32,
    ];
    for (i, d) in gdt.iter().enumerate() {
        mem.write_u64(GDT + 8 * i as u64, *d)?;
    }
    // TSS: RSP0 (unused: the guests never return to CPL0) and an I/O map
    // base past the limit (no bitmap; IOPL 3 allows the ports).
    mem.write_u64(TSS + 4, KSTACK_TOP)?;
    mem.write(TSS + 0x66, &0x68u16.to_le_bytes())?;
    Ok(())
}

fn asm_err(e: iced_x86::IcedError) -> Error {
    Error::Assemble(e.to_string())
}

/// The program for `kind`, assembled for address [`CODE`], and the user
/// entry point within it.
pub fn program(kind: WorkloadKind) -> Result<(Vec<u8>, u64), Error> {
    let mut a = CodeAssembler::new(64).map_err(asm_err)?;
    let mut user = a.create_label();
    if kind == WorkloadKind::Halt {
        build_halt(&mut a).map_err(asm_err)?;
        a.set_label(&mut user).map_err(asm_err)?;
        a.nop().map_err(asm_err)?;
    } else {
        build_stub(&mut a).map_err(asm_err)?;
        a.set_label(&mut user).map_err(asm_err)?;
        build_walker(&mut a).map_err(asm_err)?;
    }
    let result = a
        .assemble_options(CODE, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)
        .map_err(asm_err)?;
    let entry = result.label_ip(&user).map_err(asm_err)?;
    Ok((result.inner.code_buffer, entry))
}

/// CPL0: `iretq` to CPL3 at rbx with the stack at rax and IOPL 3.
fn build_stub(a: &mut CodeAssembler) -> Result<(), iced_x86::IcedError> {
    a.push(i32::from(SEL_UDATA))?;
    a.push(rax)?;
    a.push(0x3002i32)?; // IOPL 3, reserved bit 1
    a.push(i32::from(SEL_UCODE))?;
    a.push(rbx)?;
    a.iretq()?;
    Ok(())
}

/// CPL0: "halt\n" on the console, then HLT.
fn build_halt(a: &mut CodeAssembler) -> Result<(), iced_x86::IcedError> {
    a.mov(dx, PORT_CONSOLE as u32)?;
    for b in b"halt\n" {
        a.mov(al, u32::from(*b))?;
        a.out(dx, al)?;
    }
    let mut again = a.create_label();
    a.set_label(&mut again)?;
    a.hlt()?;
    a.jmp(again)?;
    Ok(())
}

/// CPL3: the walker (see the module documentation). Registers: r8 base,
/// r9 end, r10 stride, r11 seed, r12/r13 shared block, r14 mailbox, r15 id;
/// rbp holds [`MULT`], rbx the pass, rsi the running sum.
fn build_walker(a: &mut CodeAssembler) -> Result<(), iced_x86::IcedError> {
    let mut fill_page = a.create_label();
    let mut fill_word = a.create_label();
    let mut pass = a.create_label();
    let mut page = a.create_label();
    let mut word = a.create_label();
    let mut word_ok = a.create_label();
    let mut word_bad = a.create_label();
    let mut shared = a.create_label();
    let mut shared_word = a.create_label();
    let mut shared_ok = a.create_label();
    let mut shared_bad = a.create_label();
    let mut report = a.create_label();
    let mut pages_done = a.create_label();

    a.mov(rbp, MULT)?;
    // Fill: word = (addr ^ seed) * M.
    a.mov(rdi, r8)?;
    a.set_label(&mut fill_page)?;
    a.mov(rcx, rdi)?;
    a.set_label(&mut fill_word)?;
    a.mov(rax, rcx)?;
    a.xor(rax, r11)?;
    a.imul_2(rax, rbp)?;
    a.mov(qword_ptr(rcx), rax)?;
    a.add(rcx, 8)?;
    a.test(rcx, 0xfff)?;
    a.jnz(fill_word)?;
    a.add(rdi, r10)?;
    a.cmp(rdi, r9)?;
    a.jb(fill_page)?;
    // Report pass 0 ("filled").
    a.xor(ebx, ebx)?;
    a.xor(esi, esi)?;
    a.jmp(report)?;

    a.set_label(&mut pass)?;
    a.inc(rbx)?;
    a.xor(esi, esi)?;
    a.mov(rdi, r8)?;
    a.set_label(&mut page)?;
    a.cmp(rdi, r9)?;
    a.jae(pages_done)?;
    a.mov(rcx, rdi)?;
    a.set_label(&mut word)?;
    a.mov(rax, rcx)?;
    a.xor(rax, r11)?;
    a.imul_2(rax, rbp)?;
    a.add(rax, rbx)?; // the new value
    a.mov(rdx, qword_ptr(rcx))?;
    a.add(rsi, rdx)?;
    a.add(rdx, 1)?; // old + 1 must equal new
    a.cmp(rdx, rax)?;
    a.jne(word_bad)?;
    a.set_label(&mut word_ok)?;
    a.mov(qword_ptr(rcx), rax)?;
    a.add(rcx, 8)?;
    a.test(rcx, 0xfff)?;
    a.jnz(word)?;
    a.add(rdi, r10)?;
    a.jmp(page)?;

    a.set_label(&mut pages_done)?;
    a.mov(rcx, r12)?;
    a.set_label(&mut shared)?;
    a.cmp(rcx, r13)?;
    a.jae(report)?;
    a.set_label(&mut shared_word)?;
    a.mov(rax, rcx)?;
    a.xor(rax, r11)?;
    a.imul_2(rax, rbp)?;
    a.mov(rdx, qword_ptr(rcx))?;
    a.add(rsi, rdx)?;
    a.cmp(rdx, rax)?;
    a.jne(shared_bad)?;
    a.set_label(&mut shared_ok)?;
    a.add(rcx, 8)?;
    a.jmp(shared)?;

    a.set_label(&mut report)?;
    a.mov(qword_ptr(r14 + Mailbox::PASS as i32), rbx)?;
    a.mov(qword_ptr(r14 + Mailbox::SUM as i32), rsi)?;
    a.mov(rdx, MMIO_REPORT)?;
    a.mov(eax, r15d)?;
    a.mov(dword_ptr(rdx), eax)?;
    a.jmp(pass)?;

    // Slow paths: count the mismatch, remember the first address, go on.
    for (bad, ok) in [(&mut word_bad, word_ok), (&mut shared_bad, shared_ok)] {
        let mut counted = a.create_label();
        a.set_label(bad)?;
        a.inc(qword_ptr(r14 + Mailbox::MISMATCHES as i32))?;
        a.cmp(qword_ptr(r14 + Mailbox::FIRST_BAD as i32), 0)?;
        a.jne(counted)?;
        a.mov(qword_ptr(r14 + Mailbox::FIRST_BAD as i32), rcx)?;
        a.set_label(&mut counted)?;
        a.jmp(ok)?;
    }
    let _ = shared_word;
    Ok(())
}

/// Prepares fresh memory for `workload`: boot tables, the program, and the
/// shared block's contents. Returns the user entry point.
pub fn install(mem: &GuestMemory, workload: &Workload, plans: &[VcpuPlan]) -> Result<u64, Error> {
    write_boot_tables(mem)?;
    let (code, entry) = program(workload.kind)?;
    if CODE + code.len() as u64 > KSTACK_TOP - u64::from(MAX_VCPUS) * PAGE {
        return Err(Error::Assemble("the program does not fit its slot".into()));
    }
    mem.write(CODE, &code)?;
    if let Some(p) = plans.first() {
        if p.shared_end > p.shared_base {
            let seed = workload.seed;
            mem.fill_words(p.shared_base, p.shared_end - p.shared_base, |a| {
                value(a, seed)
            })?;
        }
    }
    Ok(entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_assemble() {
        let (code, entry) = program(WorkloadKind::Walker).expect("walker");
        assert!(entry > CODE && entry < CODE + code.len() as u64);
        let (code, _) = program(WorkloadKind::Halt).expect("halt");
        assert!(!code.is_empty());
    }

    #[test]
    fn plans_split_memory_and_sums_follow_passes() {
        let w = Workload {
            kind: WorkloadKind::Sparse,
            seed: 7,
            shared_bytes: 2 * PAGE,
        };
        let plans = w.plan(64 << 20, 2).expect("plan");
        assert_eq!(plans.len(), 2);
        assert_eq!(plans[0].end, plans[1].base);
        assert!(plans[1].end <= plans[1].shared_base);
        assert_eq!(plans[1].shared_end, 64 << 20);
        let s = plans[0].sums();
        // Pass 2 adds one per touched word over pass 1.
        let p1 = VcpuPlan::expected_sum(&s, 1);
        let p2 = VcpuPlan::expected_sum(&s, 2);
        assert_eq!(p2.wrapping_sub(p1), s.words);
        assert!(w.plan(2 << 20, 1).is_err());
        assert!(w.plan(64 << 20, 0).is_err());
    }
}
