//! Names of images and ids of containers. They become path components in the pool (and
//! parts of hostnames and URLs elsewhere), so only a small, safe alphabet is allowed.

use super::PoolError;

const MAX_LEN: usize = 63;

/// `[a-z0-9][a-z0-9-]{0,62}`: no `/`, no `..`, no hidden names, fits a DNS label.
pub fn validate(what: &'static str, name: &str) -> Result<(), PoolError> {
    let bytes = name.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= MAX_LEN
        && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-');
    if ok {
        Ok(())
    } else {
        Err(PoolError::InvalidName {
            what,
            name: name.to_string(),
        })
    }
}

pub fn is_valid(name: &str) -> bool {
    validate("name", name).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_alphabet() {
        for good in ["debian-13", "a", "0", "c-1-2", &"x".repeat(63)] {
            assert!(is_valid(good), "{good}");
        }
    }

    #[test]
    fn rejects_everything_else() {
        let long = "x".repeat(64);
        for bad in [
            "", "-a", "A", "a/b", "..", ".", "a..b", ".tmp-x", "a_b", "a b", "é", "a\0", &long,
        ] {
            assert!(!is_valid(bad), "{bad:?}");
        }
    }
}
