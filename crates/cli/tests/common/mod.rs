//! Helpers shared by the CLI's integration tests.

pub mod server;

/// Whether a userfaultfd can be created here. Without one the test skips
/// with a visible message, unless PAGEWIRE_REQUIRE_KVM=1 (CI): then it fails.
pub fn have_uffd() -> bool {
    match uffd::Uffd::open() {
        Ok(_) => true,
        Err(e) => {
            if std::env::var("PAGEWIRE_REQUIRE_KVM").as_deref() == Ok("1") {
                panic!("userfaultfd required but unavailable: {e}");
            }
            eprintln!("SKIPPED: cannot create a userfaultfd here: {e}");
            false
        }
    }
}

/// Whether /dev/kvm (and a userfaultfd) can be used here; the same skip rule.
#[allow(dead_code)] // not every test binary uses it
pub fn have_kvm() -> bool {
    if !have_uffd() {
        return false;
    }
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            if std::env::var("PAGEWIRE_REQUIRE_KVM").as_deref() == Ok("1") {
                panic!("/dev/kvm required but unavailable: {e}");
            }
            eprintln!("SKIPPED: /dev/kvm cannot be opened: {e}");
            false
        }
    }
}

/// Reserves `want` 2 MiB huge pages if fewer are reserved, and says whether
/// at least `need` are; the same skip rule.
#[allow(dead_code)] // not every test binary uses it
pub fn have_huge_pages(want: usize, need: usize) -> bool {
    let nr = "/proc/sys/vm/nr_hugepages";
    let read = || -> usize {
        std::fs::read_to_string(nr)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    };
    if read() < want {
        let _ = std::fs::write(nr, want.to_string());
    }
    let have = read();
    if have >= need {
        return true;
    }
    let msg = format!("only {have} huge pages could be reserved in {nr}");
    if std::env::var("PAGEWIRE_REQUIRE_KVM").as_deref() == Ok("1") {
        panic!("{msg}");
    }
    eprintln!("SKIPPED: {msg}");
    false
}
