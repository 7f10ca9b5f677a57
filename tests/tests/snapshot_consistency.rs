//! Snapshots of a guest running PostgreSQL, MariaDB and Redis (Debian 13's packages),
//! and writing to a SQLite database where the kit keeps its own, under continuous
//! writes are consistent: each branched snapshot boots, every database
//! starts and holds every row acknowledged before the snapshot was asked for, with no
//! gap (rows 1..=max), and at least as many as the snapshot's own acknowledgement files
//! claim. Needs root and the Debian mirror; cleans up on drop (see `TestNode`).

use hearth_host::bench::dbload::{self, DbState};
use hearth_tests::node::{is_root, TestNode};
use rand::Rng;
use serde_json::Value;
use std::time::{Duration, Instant};

const ROUNDS: usize = 20;

fn s(v: &Value, k: &str) -> String {
    v[k].as_str().unwrap_or_default().to_string()
}

/// Runs a script in the guest, panicking with its output if it fails.
fn sh_ok(node: &TestNode, id: &str, script: &str, what: &str) -> String {
    let (code, out, err) = node.sh(id, script);
    assert_eq!(code, 0, "{what} failed ({code}):\n{out}\n{err}");
    out
}

fn wait_systemd(node: &TestNode, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, out, _) = node.sh(id, "systemctl is-system-running");
        if matches!(out.trim(), "running" | "degraded") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "systemd of {id} did not finish booting"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn snapshots_of_running_databases_are_consistent() {
    if !is_root() {
        eprintln!("skipped: the snapshot consistency test needs root (CI runs it as root)");
        return;
    }
    let mut node = TestNode::start();
    let c = node.json(&["containers", "create", "--name", "dbs", "--memory", "2048"]);
    let id = s(&c, "id");
    wait_systemd(&node, &id);
    let t = Instant::now();
    sh_ok(&node, &id, dbload::INSTALL, "installing the databases");
    eprintln!(
        "consistency: databases installed in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    sh_ok(&node, &id, dbload::START_WRITERS, "starting the writers");

    let mut rng = rand::thread_rng();
    let mut snap_ms = Vec::new();
    for round in 0..ROUNDS {
        std::thread::sleep(Duration::from_millis(rng.gen_range(50..600)));
        let before = dbload::parse_acked(&sh_ok(&node, &id, dbload::ACKED, "reading acks"))
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        let t = Instant::now();
        let snap = node.json(&["snapshots", "create", &id]);
        snap_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        let snap = &snap["snapshot"];
        let mut quiesced: Vec<String> = snap["quiesced"]
            .as_array()
            .unwrap_or_else(|| panic!("round {round}: snapshot not quiesced: {snap}"))
            .iter()
            .filter_map(|e| e.as_str().map(str::to_string))
            .collect();
        quiesced.sort();
        assert_eq!(
            quiesced,
            ["mariadb", "postgresql", "redis", "sqlite"],
            "round {round}: every running database must be frozen"
        );
        let name = s(snap, "name");

        let branch = node.json(&[
            "containers",
            "copy",
            &id,
            "--name",
            &format!("branch{round}"),
            "--from-snapshot",
            &name,
        ]);
        let bid = s(&branch, "id");
        let out = sh_ok(
            &node,
            &bid,
            dbload::CHECK,
            "checking the branch's databases",
        );
        let states: Vec<DbState> =
            dbload::parse_check(&out).unwrap_or_else(|e| panic!("round {round}: {e}"));
        for (st, before) in states.iter().zip(&before) {
            assert_eq!(
                st.count, st.max,
                "round {round}: {} has a gap (rows 1..={} but {} of them): {out}",
                st.db, st.max, st.count
            );
            assert!(
                st.max >= *before,
                "round {round}: {} lost acknowledged rows: {} acked before the snapshot, \
                 {} in it",
                st.db,
                before,
                st.max
            );
            assert!(
                st.max >= st.acked,
                "round {round}: {} in the snapshot acked {} but holds {}",
                st.db,
                st.acked,
                st.max
            );
        }
        // Each server came up on its own; none logged a failure while starting.
        let (_, failed, _) = node.sh(&bid, "systemctl --failed --no-legend --plain");
        assert!(
            !failed.contains("postgresql")
                && !failed.contains("mariadb")
                && !failed.contains("redis"),
            "round {round}: a database unit failed in the branch: {failed}"
        );
        eprintln!(
            "consistency: round {round}: before {before:?} branch {:?} ({:.0} ms snapshot)",
            states.iter().map(|s| (s.acked, s.max)).collect::<Vec<_>>(),
            snap_ms[round]
        );
        let out = node.hearth(&["containers", "delete", &bid]);
        assert!(out.status.success(), "delete branch {round}");
        let out = node.hearth(&["snapshots", "delete", &id, &name]);
        assert!(out.status.success(), "delete snapshot {round}");
    }

    // A daemon killed in the middle of a snapshot, between the freeze and the thaw: once
    // it is back, the half-made snapshot is gone and every database takes writes again
    // within seconds, not after the agent's own 30 s freeze timeout.
    for delay_ms in [5u64, 15, 25, 40, 60] {
        node.kill_during(
            &["snapshots", "create", &id],
            Duration::from_millis(delay_ms),
        );
        node.start_daemon();
        let what = format!("hearthd killed {delay_ms} ms into a snapshot");
        let before = dbload::parse_acked(&sh_ok(&node, &id, dbload::ACKED, "reading acks"))
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = dbload::parse_acked(&sh_ok(&node, &id, dbload::ACKED, "reading acks"))
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            if now.iter().zip(&before).all(|(n, b)| n > b) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: writes still blocked 10 s after the restart: {before:?} -> {now:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let listed = node.json(&["snapshots", "list", &id]);
        let names: Vec<String> = listed["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .map(|sn| s(sn, "name"))
            .collect();
        let on_disk: Vec<String> = std::fs::read_dir(node.pool().join("snapshots").join(&id))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        for n in &on_disk {
            assert!(
                names.contains(n),
                "{what}: {n} on disk, not listed: {names:?}"
            );
        }
        for n in names {
            let out = node.hearth(&["snapshots", "delete", &id, &n]);
            assert!(out.status.success(), "{what}: delete {n}");
        }
    }

    // The writers kept going all along: the source's databases still take rows.
    let acked = dbload::parse_acked(&sh_ok(&node, &id, dbload::ACKED, "reading acks")).unwrap();
    assert!(
        acked.iter().all(|&n| n > 0),
        "a writer never got a row in: {acked:?}"
    );
    let (_, failed, _) = node.sh(&id, "systemctl --failed --no-legend --plain");
    assert!(
        !failed.contains("hearth-load"),
        "a writer failed (a freeze must block writes, never fail them): {failed}"
    );
    sh_ok(&node, &id, dbload::STOP_WRITERS, "stopping the writers");
    snap_ms.sort_by(f64::total_cmp);
    eprintln!(
        "consistency: {ROUNDS} rounds, snapshot with databases p50 {:.1} ms",
        snap_ms[snap_ms.len() / 2]
    );
}
