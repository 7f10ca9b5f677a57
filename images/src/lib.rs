//! Rootfs templates (being written).
