//! The snapshot state file: versioned JSON beside a Firecracker-layout
//! memory file (see `docs/formats.md`).
//!
//! KVM's register structures are mirrored field by field with names, so the
//! file is readable, diffable and independent of kvm-bindings' layout.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::guest::Workload;
use crate::memory::Backing;

/// Identifies the file's format.
pub const FORMAT: &str = "pagewire-vm-state";
/// The only version written and read so far.
pub const VERSION: u32 = 1;

/// Everything needed to restore a VM, except its memory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    pub format: String,
    pub version: u32,
    pub memory: MemoryState,
    pub workload: Workload,
    pub vcpus: Vec<VcpuState>,
}

/// Guest memory: where its file is and how its regions map into it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemoryState {
    /// Total guest RAM in bytes.
    pub bytes: u64,
    pub backing: Backing,
    /// The memory file, relative to the state file's directory.
    pub file: PathBuf,
    pub regions: Vec<MemoryRegion>,
}

/// One region of guest physical memory and where its bytes are in the file.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct MemoryRegion {
    pub guest_phys_addr: u64,
    pub size: u64,
    pub file_offset: u64,
}

/// One vCPU's registers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u32,
    pub regs: Regs,
    pub sregs: Sregs,
    pub fpu: Fpu,
    /// The last pass this vCPU reported before the snapshot (VMM-side
    /// device state: the next report will be this plus one).
    #[serde(default)]
    pub last_pass: Option<u64>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Regs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Segment {
    pub base: u64,
    pub limit: u32,
    pub selector: u16,
    pub type_: u8,
    pub present: u8,
    pub dpl: u8,
    pub db: u8,
    pub s: u8,
    pub l: u8,
    pub g: u8,
    pub avl: u8,
    pub unusable: u8,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct DescriptorTable {
    pub base: u64,
    pub limit: u16,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Sregs {
    pub cs: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub ss: Segment,
    pub tr: Segment,
    pub ldt: Segment,
    pub gdt: DescriptorTable,
    pub idt: DescriptorTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub apic_base: u64,
    pub interrupt_bitmap: [u64; 4],
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Fpu {
    pub fpr: [[u8; 16]; 8],
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: [[u8; 16]; 16],
    pub mxcsr: u32,
}

macro_rules! mirror {
    ($ours:ident, $kvm:ty, [$($f:ident),*]) => {
        impl From<&$kvm> for $ours {
            fn from(k: &$kvm) -> $ours {
                $ours { $($f: k.$f.into()),* }
            }
        }
        impl From<&$ours> for $kvm {
            fn from(o: &$ours) -> $kvm {
                let mut k = <$kvm>::default();
                $(k.$f = o.$f.into();)*
                k
            }
        }
    };
}

mirror!(
    Regs,
    kvm_bindings::kvm_regs,
    [rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp, r8, r9, r10, r11, r12, r13, r14, r15, rip, rflags]
);
mirror!(
    Segment,
    kvm_bindings::kvm_segment,
    [base, limit, selector, type_, present, dpl, db, s, l, g, avl, unusable]
);
mirror!(DescriptorTable, kvm_bindings::kvm_dtable, [base, limit]);
mirror!(
    Fpu,
    kvm_bindings::kvm_fpu,
    [
        fpr,
        fcw,
        fsw,
        ftwx,
        last_opcode,
        last_ip,
        last_dp,
        xmm,
        mxcsr
    ]
);

impl Sregs {
    pub fn from_kvm(k: &kvm_bindings::kvm_sregs) -> Sregs {
        Sregs {
            cs: (&k.cs).into(),
            ds: (&k.ds).into(),
            es: (&k.es).into(),
            fs: (&k.fs).into(),
            gs: (&k.gs).into(),
            ss: (&k.ss).into(),
            tr: (&k.tr).into(),
            ldt: (&k.ldt).into(),
            gdt: (&k.gdt).into(),
            idt: (&k.idt).into(),
            cr0: k.cr0,
            cr2: k.cr2,
            cr3: k.cr3,
            cr4: k.cr4,
            cr8: k.cr8,
            efer: k.efer,
            apic_base: k.apic_base,
            interrupt_bitmap: k.interrupt_bitmap,
        }
    }

    pub fn to_kvm(&self) -> kvm_bindings::kvm_sregs {
        kvm_bindings::kvm_sregs {
            cs: (&self.cs).into(),
            ds: (&self.ds).into(),
            es: (&self.es).into(),
            fs: (&self.fs).into(),
            gs: (&self.gs).into(),
            ss: (&self.ss).into(),
            tr: (&self.tr).into(),
            ldt: (&self.ldt).into(),
            gdt: (&self.gdt).into(),
            idt: (&self.idt).into(),
            cr0: self.cr0,
            cr2: self.cr2,
            cr3: self.cr3,
            cr4: self.cr4,
            cr8: self.cr8,
            efer: self.efer,
            apic_base: self.apic_base,
            interrupt_bitmap: self.interrupt_bitmap,
        }
    }
}

impl Default for Segment {
    fn default() -> Segment {
        (&kvm_bindings::kvm_segment::default()).into()
    }
}

impl Default for DescriptorTable {
    fn default() -> DescriptorTable {
        (&kvm_bindings::kvm_dtable::default()).into()
    }
}

impl VmState {
    /// Writes the state as pretty JSON to `path` (atomically: a temporary
    /// file renamed over it).
    pub fn save(&self, path: &Path) -> Result<(), Error> {
        let json = serde_json::to_vec_pretty(self).map_err(|e| Error::State {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, json)
            .map_err(|e| Error::io(format!("writing {}", tmp.display()), e))?;
        std::fs::rename(&tmp, path)
            .map_err(|e| Error::io(format!("renaming {} into place", tmp.display()), e))
    }

    /// Reads and checks a state file.
    pub fn load(path: &Path) -> Result<VmState, Error> {
        let bad = |reason: String| Error::State {
            path: path.display().to_string(),
            reason,
        };
        let bytes = std::fs::read(path).map_err(|e| bad(format!("cannot be read: {e}")))?;
        let value: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| bad(format!("is not JSON: {e}")))?;
        if value.get("format").and_then(|f| f.as_str()) != Some(FORMAT) {
            return Err(bad(format!("is not a {FORMAT} file")));
        }
        let version = value.get("version").and_then(|v| v.as_u64());
        if version != Some(u64::from(VERSION)) {
            return Err(bad(format!(
                "has version {version:?}; this pagewire reads version {VERSION}"
            )));
        }
        let state: VmState =
            serde_json::from_value(value).map_err(|e| bad(format!("is malformed: {e}")))?;
        state.check().map_err(bad)?;
        Ok(state)
    }

    fn check(&self) -> Result<(), String> {
        if self.vcpus.is_empty() {
            return Err("lists no vCPUs".into());
        }
        for (i, v) in self.vcpus.iter().enumerate() {
            if v.id as usize != i {
                return Err(format!("vCPU {i} has id {}", v.id));
            }
        }
        let mut end = 0;
        for r in &self.memory.regions {
            if r.guest_phys_addr != end || r.file_offset != end {
                return Err("memory regions must be contiguous from address 0".into());
            }
            end += r.size;
        }
        if end != self.memory.bytes {
            return Err(format!(
                "memory regions cover {end} bytes but memory.bytes is {}",
                self.memory.bytes
            ));
        }
        Ok(())
    }

    /// The highest pass any vCPU reported before the snapshot.
    pub fn last_pass(&self) -> Option<u64> {
        self.vcpus.iter().filter_map(|v| v.last_pass).max()
    }

    /// The memory file's path, resolved against the state file's directory.
    pub fn memory_path(&self, state_path: &Path) -> PathBuf {
        match state_path.parent() {
            Some(dir) => dir.join(&self.memory.file),
            None => self.memory.file.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_round_trip_through_json() {
        let mut k = crate::guest::boot_sregs(kvm_bindings::kvm_sregs::default());
        k.interrupt_bitmap[1] = 5;
        let s = Sregs::from_kvm(&k);
        let json = serde_json::to_string(&s).expect("json");
        let back: Sregs = serde_json::from_str(&json).expect("parse");
        let k2 = back.to_kvm();
        assert_eq!(k2.cs.l, 1);
        assert_eq!(k2.tr.selector, k.tr.selector);
        assert_eq!(k2.gdt.base, k.gdt.base);
        assert_eq!(k2.efer, k.efer);
        assert_eq!(k2.interrupt_bitmap, k.interrupt_bitmap);
        let regs = kvm_bindings::kvm_regs {
            rip: 9,
            r15: 3,
            ..Default::default()
        };
        let r = Regs::from(&regs);
        assert_eq!(kvm_bindings::kvm_regs::from(&r).r15, 3);
    }

    #[test]
    fn rejects_other_formats_and_versions() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("s.json");
        std::fs::write(&p, r#"{"format":"x","version":1}"#).expect("write");
        assert!(VmState::load(&p)
            .expect_err("format")
            .to_string()
            .contains("is not a"));
        std::fs::write(&p, r#"{"format":"pagewire-vm-state","version":9}"#).expect("write");
        assert!(VmState::load(&p)
            .expect_err("version")
            .to_string()
            .contains("version"));
        assert!(VmState::load(&dir.path().join("none")).is_err());
    }
}
