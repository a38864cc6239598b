//! Helpers shared by the CLI's integration tests.

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
