//! A small safe wrapper over liblxc (through `lxc-sys`), covering what hearth uses.
//!
//! Not the `lxc` crate: 0.8 has use-after-free bugs in attach and config-path handling
//! (platform notes). Every call here is blocking; callers run them off the async
//! runtime's worker threads. `start` forks (it daemonizes a monitor process), so it is
//! only called from the single-threaded `hearthd forkstart` helper.

use std::ffi::{CStr, CString};
use std::path::Path;
use std::ptr::NonNull;

#[derive(Debug, thiserror::Error)]
pub enum LxcError {
    #[error("invalid argument for liblxc: {0}")]
    Invalid(String),
    #[error("liblxc could not allocate a handle for container {0}")]
    Alloc(String),
    #[error("container {name}: {op} failed{detail}")]
    Failed {
        name: String,
        op: &'static str,
        detail: String,
    },
}

/// One liblxc container handle (refcounted by liblxc; released on drop).
pub struct Container {
    ptr: NonNull<lxc_sys::lxc_container>,
    name: String,
}

// SAFETY: a handle is only ever used by one thread at a time (it is not Sync); liblxc
// protects the container's on-disk state with its own locks.
unsafe impl Send for Container {}

fn cstring(s: &str) -> Result<CString, LxcError> {
    CString::new(s).map_err(|_| LxcError::Invalid(format!("{s:?} contains a NUL byte")))
}

impl Container {
    /// Opens container `name` whose config lives in `<lxcpath>/<name>/config`.
    pub fn open(name: &str, lxcpath: &Path) -> Result<Container, LxcError> {
        let cname = cstring(name)?;
        let cpath = cstring(
            lxcpath
                .to_str()
                .ok_or_else(|| LxcError::Invalid("lxc path is not UTF-8".into()))?,
        )?;
        // SAFETY: both strings outlive the call; liblxc copies them.
        let raw = unsafe { lxc_sys::lxc_container_new(cname.as_ptr(), cpath.as_ptr()) };
        let ptr = NonNull::new(raw).ok_or_else(|| LxcError::Alloc(name.to_string()))?;
        Ok(Container {
            ptr,
            name: name.to_string(),
        })
    }

    fn raw(&self) -> *mut lxc_sys::lxc_container {
        self.ptr.as_ptr()
    }

    fn failed(&self, op: &'static str) -> LxcError {
        // SAFETY: error_string is either null or a NUL-terminated string owned by liblxc.
        let detail = unsafe {
            let s = (*self.raw()).error_string;
            if s.is_null() {
                String::new()
            } else {
                format!(": {}", CStr::from_ptr(s).to_string_lossy())
            }
        };
        LxcError::Failed {
            name: self.name.clone(),
            op,
            detail,
        }
    }

    pub fn is_defined(&self) -> bool {
        // SAFETY: the function pointers of a live handle are always set by liblxc.
        unsafe { (*self.raw()).is_defined.is_some_and(|f| f(self.raw())) }
    }

    pub fn is_running(&self) -> bool {
        // SAFETY: as above.
        unsafe { (*self.raw()).is_running.is_some_and(|f| f(self.raw())) }
    }

    /// "STOPPED", "STARTING", "RUNNING", "STOPPING", "ABORTING", "FREEZING", "FROZEN"...
    pub fn state(&self) -> String {
        // SAFETY: state returns a static string (or null).
        unsafe {
            let Some(f) = (*self.raw()).state else {
                return "UNKNOWN".into();
            };
            let s = f(self.raw());
            if s.is_null() {
                "UNKNOWN".into()
            } else {
                CStr::from_ptr(s).to_string_lossy().into_owned()
            }
        }
    }

    /// The container's init process as seen from the host.
    pub fn init_pid(&self) -> Option<i32> {
        // SAFETY: as above.
        let pid = unsafe { (*self.raw()).init_pid.map_or(-1, |f| f(self.raw())) };
        (pid > 0).then_some(pid)
    }

    /// Starts the container with its configured `lxc.init.cmd`, daemonized: returns once
    /// the container is RUNNING, leaving liblxc's monitor process behind (so the
    /// container outlives this process and `hearthd`).
    pub fn start(&self) -> Result<(), LxcError> {
        // SAFETY: a null argv means "use lxc.init.cmd"; function pointers are set.
        let ok = unsafe {
            if let Some(d) = (*self.raw()).want_daemonize {
                d(self.raw(), true);
            }
            (*self.raw())
                .start
                .is_some_and(|f| f(self.raw(), 0, std::ptr::null()))
        };
        if ok {
            Ok(())
        } else {
            Err(self.failed("start"))
        }
    }

    /// Asks init to shut down cleanly and waits up to `timeout_secs`. `Ok(false)` when it
    /// did not stop in time.
    pub fn shutdown(&self, timeout_secs: i32) -> Result<bool, LxcError> {
        // SAFETY: as above.
        let ok = unsafe {
            (*self.raw())
                .shutdown
                .is_some_and(|f| f(self.raw(), timeout_secs))
        };
        Ok(ok)
    }

    /// Kills the container immediately.
    pub fn stop(&self) -> Result<(), LxcError> {
        // SAFETY: as above.
        let ok = unsafe { (*self.raw()).stop.is_some_and(|f| f(self.raw())) };
        if ok || !self.is_running() {
            Ok(())
        } else {
            Err(self.failed("stop"))
        }
    }

    /// Waits until the container reaches `state` or `timeout_secs` pass.
    pub fn wait(&self, state: &str, timeout_secs: i32) -> bool {
        let Ok(s) = cstring(state) else {
            return false;
        };
        // SAFETY: `s` outlives the call.
        unsafe {
            (*self.raw())
                .wait
                .is_some_and(|f| f(self.raw(), s.as_ptr(), timeout_secs))
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        // SAFETY: releases the reference taken by lxc_container_new, exactly once.
        unsafe {
            lxc_sys::lxc_container_put(self.raw());
        }
    }
}
