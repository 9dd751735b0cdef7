//! The fuzz targets' checks, shared with `tests/fuzz_regressions.rs` and
//! `tests/fuzz_properties.rs` (which include these files by path), so that a
//! regression input runs through exactly the code its target ran.

pub mod checks;
pub mod gcm_checks;
