//! Which database units run: asked of systemd over D-Bus on one kept bus connection
//! (a freeze should not pay a bus login), else through `systemctl`.

use std::process::Stdio;
use tokio::sync::Mutex;

type UnitStatus = (
    String,
    String,
    String,
    String,
    String,
    String,
    zbus::zvariant::OwnedObjectPath,
    u32,
    String,
    zbus::zvariant::OwnedObjectPath,
);

/// The system bus connection, opened at the first freeze and kept.
static BUS: Mutex<Option<zbus::Connection>> = Mutex::const_new(None);

/// The names of the active units matching `patterns`, from systemd over the D-Bus
/// system bus, else through `systemctl` (a guest whose bus is not up yet). A guest
/// without systemd has none. (systemd's private peer-to-peer socket would not need the
/// bus daemon, but zbus 5.19 panics on the sender field of its replies.)
pub(super) async fn active_units(patterns: &[&str]) -> Vec<String> {
    match dbus_active_units(patterns).await {
        Ok(units) => units,
        Err(e) => {
            tracing::debug!("systemd over D-Bus: {e}; asking systemctl");
            systemctl_active_units().await
        }
    }
}

async fn dbus_active_units(patterns: &[&str]) -> zbus::Result<Vec<String>> {
    let mut bus = BUS.lock().await;
    // A kept connection that fails (the bus restarted) is replaced once.
    for attempt in 0..2 {
        let conn = match bus.as_ref() {
            Some(c) => c.clone(),
            None => {
                let c = zbus::Connection::system().await?;
                *bus = Some(c.clone());
                c
            }
        };
        let reply = conn
            .call_method(
                Some("org.freedesktop.systemd1"),
                "/org/freedesktop/systemd1",
                Some("org.freedesktop.systemd1.Manager"),
                "ListUnitsByPatterns",
                &(["active"].as_slice(), patterns),
            )
            .await;
        match reply {
            Ok(r) => {
                let units: Vec<UnitStatus> = r.body().deserialize()?;
                return Ok(units.into_iter().map(|u| u.0).collect());
            }
            Err(_) if attempt == 0 => *bus = None,
            Err(e) => return Err(e),
        }
    }
    Err(zbus::Error::Failure("systemd did not answer".into()))
}

async fn systemctl_active_units() -> Vec<String> {
    let out = super::command("systemctl")
        .args([
            "list-units",
            "--type=service",
            "--state=active",
            "--plain",
            "--no-legend",
            "--no-pager",
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .await;
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    }
}

/// Does `unit` match `pattern`, where a `*` in the pattern stands for any instance
/// (`postgresql@*.service` matches `postgresql@17-main.service`)?
pub(super) fn unit_matches(pattern: &str, unit: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == unit,
        Some((pre, post)) => {
            unit.len() >= pre.len() + post.len() && unit.starts_with(pre) && unit.ends_with(post)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_patterns_match_instances() {
        assert!(unit_matches("mariadb.service", "mariadb.service"));
        assert!(!unit_matches("mariadb.service", "mariadb-backup.service"));
        assert!(unit_matches(
            "postgresql@*.service",
            "postgresql@17-main.service"
        ));
        assert!(!unit_matches("postgresql@*.service", "postgresql.service"));
        assert!(!unit_matches(
            "redis-server@*.service",
            "redis-server@.servic"
        ));
    }
}
