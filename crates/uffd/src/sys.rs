//! The one place where this crate calls `ioctl(2)`.
//!
//! Every request goes through [`call`], which hands the kernel a pointer to a
//! `#[repr(C)]` argument struct from `linux-raw-sys` and returns the ioctl's
//! integer result. Opcodes that `linux-raw-sys` does not precompute (MOVE,
//! POISON, PAGEMAP_SCAN, USERFAULTFD_IOC_NEW) are derived from their structs
//! with rustix's `opcode` helpers, exactly as the C `_IOWR` macros do.

use linux_raw_sys::general as g;
use rustix::fd::AsFd;
use rustix::io::Errno;
use rustix::ioctl::{opcode, Ioctl, IoctlOutput, Opcode};

/// `UFFDIO` ioctl group (0xAA).
const UFFDIO: u8 = 0xAA;

pub(crate) const API: Opcode = opcode::read_write::<g::uffdio_api>(UFFDIO, g::_UFFDIO_API as u8);
pub(crate) const REGISTER: Opcode =
    opcode::read_write::<g::uffdio_register>(UFFDIO, g::_UFFDIO_REGISTER as u8);
pub(crate) const UNREGISTER: Opcode =
    opcode::read::<g::uffdio_range>(UFFDIO, g::_UFFDIO_UNREGISTER as u8);
pub(crate) const WAKE: Opcode = opcode::read::<g::uffdio_range>(UFFDIO, g::_UFFDIO_WAKE as u8);
pub(crate) const COPY: Opcode = opcode::read_write::<g::uffdio_copy>(UFFDIO, g::_UFFDIO_COPY as u8);
pub(crate) const ZEROPAGE: Opcode =
    opcode::read_write::<g::uffdio_zeropage>(UFFDIO, g::_UFFDIO_ZEROPAGE as u8);
pub(crate) const MOVE: Opcode = opcode::read_write::<g::uffdio_move>(UFFDIO, g::_UFFDIO_MOVE as u8);
pub(crate) const WRITEPROTECT: Opcode =
    opcode::read_write::<g::uffdio_writeprotect>(UFFDIO, g::_UFFDIO_WRITEPROTECT as u8);
pub(crate) const CONTINUE: Opcode =
    opcode::read_write::<g::uffdio_continue>(UFFDIO, g::_UFFDIO_CONTINUE as u8);
pub(crate) const POISON: Opcode =
    opcode::read_write::<g::uffdio_poison>(UFFDIO, g::_UFFDIO_POISON as u8);
/// `USERFAULTFD_IOC_NEW`, `_IO(0xAA, 0x00)` on `/dev/userfaultfd`.
pub(crate) const IOC_NEW: Opcode = opcode::none(UFFDIO, 0);
/// `PAGEMAP_SCAN`, `_IOWR('f', 16, struct pm_scan_arg)` on `/proc/PID/pagemap`.
pub(crate) const PAGEMAP_SCAN: Opcode = opcode::read_write::<g::pm_scan_arg>(b'f', 16);

/// An ioctl whose argument is a pointer to `T` (or, with `T = ()`, an integer
/// carried in the pointer slot) and whose integer result is returned.
struct Call<'a, T> {
    opcode: Opcode,
    arg: *mut core::ffi::c_void,
    _value: core::marker::PhantomData<&'a mut T>,
}

// SAFETY: `opcode` names a request whose argument is exactly `T` (checked at
// each call site, which uses the matching `linux-raw-sys` struct), and `arg`
// points at a live, exclusively borrowed `T` for the duration of the call.
unsafe impl<T> Ioctl for Call<'_, T> {
    type Output = IoctlOutput;
    const IS_MUTATING: bool = true;

    fn opcode(&self) -> Opcode {
        self.opcode
    }

    fn as_ptr(&mut self) -> *mut core::ffi::c_void {
        self.arg
    }

    unsafe fn output_from_ptr(
        out: IoctlOutput,
        _ptr: *mut core::ffi::c_void,
    ) -> rustix::io::Result<IoctlOutput> {
        Ok(out)
    }
}

/// Issues `opcode` on `fd` with a pointer to `arg`.
///
/// # Safety
/// `opcode` must be a request whose argument is a pointer to a `T`, and any
/// memory the kernel reads or writes through pointers inside `arg` must be
/// valid for that access.
pub(crate) unsafe fn call<F: AsFd, T>(fd: F, opcode: Opcode, arg: &mut T) -> Result<i32, Errno> {
    let call = Call::<T> {
        opcode,
        arg: (arg as *mut T).cast(),
        _value: core::marker::PhantomData,
    };
    // SAFETY: forwarded from this function's contract.
    unsafe { rustix::ioctl::ioctl(fd, call) }
}

/// Issues `opcode` on `fd` with an integer argument.
///
/// # Safety
/// `opcode` must be a request that takes an integer (not a pointer).
pub(crate) unsafe fn call_int<F: AsFd>(fd: F, opcode: Opcode, value: usize) -> Result<i32, Errno> {
    let call = Call::<()> {
        opcode,
        // The kernel reads the pointer slot as an integer for these requests.
        arg: value as *mut core::ffi::c_void,
        _value: core::marker::PhantomData,
    };
    // SAFETY: forwarded from this function's contract; the kernel does not
    // dereference the argument of an integer request.
    unsafe { rustix::ioctl::ioctl(fd, call) }
}
