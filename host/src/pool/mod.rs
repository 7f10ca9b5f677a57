//! The storage pool (being written).
