//! Runs `pagewire check --json` against the live kernel and checks that every
//! access path a VMM needs reaches the userfaultfd handler.

use std::io::Write as _;
use std::path::Path;
use std::process::Command;

use serde_json::Value;

fn run_check() -> (std::process::ExitStatus, Value, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pagewire"))
        .args(["check", "--json"])
        .output()
        .expect("running pagewire check --json");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let report: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!("check --json printed no JSON ({e}):\nstdout:\n{stdout}\nstderr:\n{stderr}")
    });
    (out.status, report, stdout)
}

fn path<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["paths"]
        .as_array()
        .expect("`paths` is an array")
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no path named {name} in the report"))
}

fn assert_served(report: &Value, name: &str, json: &str) {
    let p = path(report, name);
    assert_eq!(p["observed"], "served", "{name} is not served: {p}\n{json}");
    assert_eq!(p["as_expected"], true, "{name}: {p}");
    assert!(
        p["faults"].as_u64().unwrap_or(0) > 0,
        "{name}: the handler saw no fault: {p}"
    );
    assert_eq!(p["required"], true, "{name} should be required: {p}");
}

#[test]
fn check_reports_every_vmm_access_path_served() {
    let (status, report, json) = run_check();

    // Kernel features and open paths are reported.
    let features = report["features"]
        .as_array()
        .expect("`features` is an array");
    assert!(!features.is_empty(), "no features listed:\n{json}");
    assert!(
        features
            .iter()
            .all(|f| f["name"].is_string() && f["offered"].is_boolean()),
        "malformed feature rows:\n{json}"
    );
    assert!(report["ioctls"].is_array(), "no ioctls:\n{json}");
    for key in ["dev_userfaultfd", "syscall", "uffd_open"] {
        assert!(
            report["open_paths"][key]["works"].is_boolean(),
            "open_paths.{key} missing:\n{json}"
        );
    }
    assert_eq!(report["open_paths"]["uffd_open"]["works"], true, "{json}");

    for name in [
        "thread",
        "o_direct",
        "process_vm_readv",
        "futex",
        "io_uring",
    ] {
        assert_served(&report, name, &json);
    }

    let mem = path(&report, "proc_self_mem");
    assert_eq!(mem["observed"], "failed", "{mem}");
    assert_eq!(mem["errno"], "EIO", "{mem}");
    assert_eq!(mem["faults"], 0, "{mem}");
    assert_eq!(mem["as_expected"], true, "{mem}");

    let kvm = path(&report, "kvm");
    if Path::new("/dev/kvm").exists() {
        assert_served(&report, "kvm", &json);
    } else {
        assert_eq!(kvm["observed"], "skipped", "{kvm}");
        if std::env::var("PAGEWIRE_REQUIRE_KVM").as_deref() == Ok("1") {
            panic!("PAGEWIRE_REQUIRE_KVM=1 but there is no /dev/kvm");
        }
        // Written to stderr directly: the test harness captures `eprintln!`
        // of passing tests, and this message must stay visible.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: no /dev/kvm (the KVM access path was not tested; \
             set PAGEWIRE_REQUIRE_KVM=1 to make this a failure)"
        );
    }

    assert_eq!(report["all_required_as_expected"], true, "{json}");
    assert!(
        status.success(),
        "pagewire check exited with {status}:\n{json}"
    );
}
