//! Where the pool lives, as read from the `[pool]` table of hearth's TOML config:
//!
//! ```toml
//! [pool]                                  # a loop file (the default; every key optional)
//! loop_file = "/var/lib/hearth/pool.img"
//! size = "20G"                            # bytes as an integer, or with K/M/G/T (binary)
//! mountpoint = "/var/lib/hearth/pool"
//! ```
//!
//! ```toml
//! [pool]                                  # or a btrfs file system the operator mounted
//! path = "/mnt/btrfs/hearth"
//! ```
//!
//! `path` cannot be combined with the loop-file keys. An empty or missing `[pool]` table
//! means the default loop file.
//!
//! ```toml
//! [pool]
//! quotas = "auto"    # or "simple", "full", "off": how per-container disk caps are kept
//! ```
//!
//! `auto` turns btrfs simple quotas on for a loop-file pool (hearth owns that file
//! system), falling back to full qgroups on kernels older than 6.7; on an operator's
//! `path` it uses quotas only if they are on already, because switching them on sets a
//! feature flag on that whole file system. `simple` and `full` switch that mode on
//! wherever the pool is; `off` never limits a container's disk.

use serde::Deserialize;
use std::path::PathBuf;

pub const DEFAULT_LOOP_FILE: &str = "/var/lib/hearth/pool.img";
pub const DEFAULT_MOUNTPOINT: &str = "/var/lib/hearth/pool";
pub const DEFAULT_SIZE: u64 = 20 << 30;
/// Below this mkfs.btrfs's own minimum and metadata overhead leave no useful space.
pub const MIN_SIZE: u64 = 256 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "PoolTable")]
pub struct PoolConfig {
    pub kind: PoolKind,
    pub quotas: QuotaMode,
}

/// How the pool keeps per-container disk caps (see the module docs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuotaMode {
    #[default]
    Auto,
    Simple,
    Full,
    Off,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolKind {
    /// A sparse file formatted as btrfs and loop-mounted by hearth itself: works on any
    /// host file system, which is why it is the default.
    LoopFile {
        file: PathBuf,
        size_bytes: u64,
        mountpoint: PathBuf,
    },
    /// A directory on a btrfs file system the operator provides and mounts.
    Existing { path: PathBuf },
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            kind: PoolKind::LoopFile {
                file: PathBuf::from(DEFAULT_LOOP_FILE),
                size_bytes: DEFAULT_SIZE,
                mountpoint: PathBuf::from(DEFAULT_MOUNTPOINT),
            },
            quotas: QuotaMode::Auto,
        }
    }
}

impl PoolConfig {
    pub fn loop_file(file: PathBuf, size_bytes: u64, mountpoint: PathBuf) -> Self {
        PoolConfig {
            kind: PoolKind::LoopFile {
                file,
                size_bytes,
                mountpoint,
            },
            quotas: QuotaMode::Auto,
        }
    }

    pub fn existing(path: PathBuf) -> Self {
        PoolConfig {
            kind: PoolKind::Existing { path },
            quotas: QuotaMode::Auto,
        }
    }

    /// Checks what serde cannot: absolute paths and a usable size. Also applied by
    /// `BtrfsPool::open`, so configs built in code get the same checks.
    pub fn validate(&self) -> Result<(), String> {
        let absolute = |key: &str, p: &PathBuf| {
            if p.is_absolute() {
                Ok(())
            } else {
                Err(format!(
                    "pool.{key} must be an absolute path, not {}",
                    p.display()
                ))
            }
        };
        match &self.kind {
            PoolKind::LoopFile {
                file,
                size_bytes,
                mountpoint,
            } => {
                absolute("loop_file", file)?;
                absolute("mountpoint", mountpoint)?;
                if *size_bytes < MIN_SIZE {
                    return Err(format!(
                        "pool.size {size_bytes} is below the minimum of {MIN_SIZE} bytes"
                    ));
                }
                Ok(())
            }
            PoolKind::Existing { path } => absolute("path", path),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolTable {
    loop_file: Option<PathBuf>,
    size: Option<Size>,
    mountpoint: Option<PathBuf>,
    path: Option<PathBuf>,
    #[serde(default)]
    quotas: QuotaMode,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Size {
    Bytes(u64),
    Text(String),
}

impl TryFrom<PoolTable> for PoolConfig {
    type Error = String;

    fn try_from(t: PoolTable) -> Result<Self, String> {
        let mut cfg = match t.path {
            Some(path) => {
                if t.loop_file.is_some() || t.size.is_some() || t.mountpoint.is_some() {
                    return Err(
                        "pool.path (an existing btrfs) cannot be combined with loop_file, size \
                         or mountpoint"
                            .into(),
                    );
                }
                PoolConfig::existing(path)
            }
            None => PoolConfig::loop_file(
                t.loop_file
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_LOOP_FILE)),
                match t.size {
                    None => DEFAULT_SIZE,
                    Some(Size::Bytes(n)) => n,
                    Some(Size::Text(s)) => parse_size(&s)?,
                },
                t.mountpoint
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_MOUNTPOINT)),
            ),
        };
        cfg.quotas = t.quotas;
        cfg.validate()?;
        Ok(cfg)
    }
}

/// `"20G"`, `"20GiB"`, `"512M"`, `"1T"`, `"4096"`: binary units, case-insensitive.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => {
            return Err(format!(
                "pool.size {text:?}: unknown unit (use K, M, G or T)"
            ))
        }
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1u64 << shift))
        .ok_or_else(|| format!("pool.size {text:?} is not a size"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<PoolConfig, String> {
        serde_json::from_str(json).map_err(|e| e.to_string())
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("20G").unwrap(), 20 << 30);
        assert_eq!(parse_size("20GiB").unwrap(), 20 << 30);
        assert_eq!(parse_size("512m").unwrap(), 512 << 20);
        assert_eq!(parse_size("1 T").unwrap(), 1 << 40);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        for bad in ["", "G", "1.5G", "20X", "-1G", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn empty_table_is_the_default_loop_file() {
        assert_eq!(parse("{}").unwrap(), PoolConfig::default());
    }

    #[test]
    fn loop_file_keys() {
        let c =
            parse(r#"{"loop_file": "/srv/p.img", "size": "1G", "mountpoint": "/srv/p"}"#).unwrap();
        assert_eq!(
            c,
            PoolConfig::loop_file("/srv/p.img".into(), 1 << 30, "/srv/p".into())
        );
        let c = parse(r#"{"size": 1073741824}"#).unwrap();
        assert!(matches!(c.kind, PoolKind::LoopFile { size_bytes, .. } if size_bytes == 1 << 30));
    }

    #[test]
    fn existing_path() {
        assert_eq!(
            parse(r#"{"path": "/mnt/btrfs"}"#).unwrap(),
            PoolConfig::existing("/mnt/btrfs".into())
        );
    }

    #[test]
    fn quota_modes() {
        assert_eq!(parse("{}").unwrap().quotas, QuotaMode::Auto);
        for (text, mode) in [
            ("simple", QuotaMode::Simple),
            ("full", QuotaMode::Full),
            ("off", QuotaMode::Off),
        ] {
            let c = parse(&format!(r#"{{"path": "/mnt/b", "quotas": "{text}"}}"#)).unwrap();
            assert_eq!(c.quotas, mode);
        }
        assert!(parse(r#"{"quotas": "squota"}"#).is_err());
    }

    #[test]
    fn contradictions_and_mistakes_are_errors() {
        for bad in [
            r#"{"path": "/mnt/btrfs", "size": "1G"}"#,
            r#"{"path": "relative"}"#,
            r#"{"loop_file": "pool.img"}"#,
            r#"{"size": "1M"}"#,
            r#"{"sise": "1G"}"#,
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
