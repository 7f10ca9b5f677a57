//! Root's subordinate uid/gid ranges (/etc/subuid, /etc/subgid), from which every
//! container gets its own private block. Added when missing, as `usermod --add-subuids`
//! would, so a fresh node needs no manual step.

use std::path::Path;

/// Makes sure root owns `[start, start + count)` in `file`; appends a line if not.
pub fn ensure_root_range(file: &Path, start: u64, count: u64) -> std::io::Result<bool> {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e),
    };
    if covers(&text, start, count) {
        return Ok(false);
    }
    let mut new = text;
    if !new.is_empty() && !new.ends_with('\n') {
        new.push('\n');
    }
    new.push_str(&format!("root:{start}:{count}\n"));
    let tmp = file.with_extension("hearth-tmp");
    std::fs::write(&tmp, new)?;
    std::fs::rename(&tmp, file)?;
    Ok(true)
}

fn covers(text: &str, start: u64, count: u64) -> bool {
    text.lines().any(|l| {
        let mut f = l.split(':');
        let (Some(user), Some(s), Some(n)) = (f.next(), f.next(), f.next()) else {
            return false;
        };
        let (Ok(s), Ok(n)) = (s.trim().parse::<u64>(), n.trim().parse::<u64>()) else {
            return false;
        };
        (user == "root" || user == "0") && s <= start && start + count <= s + n
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_only_when_root_lacks_the_range() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("subuid");
        std::fs::write(&f, "alice:100000:65536").unwrap();
        assert!(ensure_root_range(&f, 1_000_000, 10_000_000).unwrap());
        assert!(!ensure_root_range(&f, 1_000_000, 10_000_000).unwrap());
        assert!(!ensure_root_range(&f, 2_000_000, 65_536).unwrap());
        let text = std::fs::read_to_string(&f).unwrap();
        assert_eq!(text, "alice:100000:65536\nroot:1000000:10000000\n");
    }
}
