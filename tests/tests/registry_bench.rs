//! The load generator of scripts/registry-bench.sh, run small against an
//! in-process registry on SQLite so it cannot rot: every phase must finish
//! all its operations with no failure and print a report that parses. No
//! timing is asserted (the figures are printed).

use std::process::Command;
use std::time::Duration;

use pilot_tests::load_report::PhaseReport;
use pilot_tests::RegistryHandle;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_phase_completes_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let reg = RegistryHandle::start(dir.path(), "127.0.0.1:0".parse().unwrap()).await;
    let join = reg.join.to_string();
    let pid = std::process::id().to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_registry-load"))
            .args(["run", "--join", &join, "--label", "suite"])
            .args([
                "--identities",
                "120",
                "--statements",
                "120",
                "--lookups",
                "300",
            ])
            .args([
                "--burst",
                "60",
                "--relay-mbps",
                "5",
                "--phase-deadline-s",
                "30",
            ])
            .args(["--watch", &format!("registry={pid}"), "--rss", &pid])
            .output()
            .expect("run registry-load")
    });
    let out = tokio::time::timeout(Duration::from_secs(120), out)
        .await
        .expect("registry-load finished within 120 s")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "registry-load failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reports: Vec<PhaseReport> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let phases: Vec<&str> = reports.iter().map(|r| r.phase.as_str()).collect();
    assert_eq!(phases, ["register", "statements", "lookups", "burst"]);
    for r in &reports {
        assert_eq!(r.label, "suite");
        assert_eq!((r.ok, r.failed), (r.ops, 0), "{}: {r:?}", r.phase);
        assert!(r.ops > 0 && r.p99_ms >= r.p50_ms, "{r:?}");
        assert!(r.cpu_s.contains_key("generator") && r.cpu_s.contains_key("registry"));
        assert_eq!(r.registry_rss_kib.len(), 1);
        assert!(r.registry_rss_kib[0] > 0);
    }
    assert_eq!(reports[2].identities, 120);
    let burst = reports[3]
        .burst
        .as_ref()
        .expect("the burst phase reports the prober");
    assert!(burst.stun_samples > 0, "{burst:?}");
    assert!(burst.stun_lost < burst.stun_samples, "{burst:?}");
    assert_eq!(
        burst.relay_offered_mbps, 5.0,
        "the relayed pair was set up: {burst:?}"
    );
    assert!(
        burst.relay_burst_mbps + burst.relay_quiet_mbps > 0.0,
        "{burst:?}"
    );
    // The registry counted what the generator says it did.
    let s = &reg.stats;
    let lookups = s.lookups.load(std::sync::atomic::Ordering::Relaxed);
    assert!(lookups >= 300, "registry answered {lookups} lookups");
    reg.stop().await;
}
