//! Content classification: what sensitive data a file carries.
//!
//! The detectors are pure functions over text; extraction (plain text, GB18030,
//! office formats) and the per-detector thresholds from the policy sit on top. A
//! finding carries counts and masked samples only — never the matched content in
//! clear, because findings travel to the collector and into reports.

pub mod detectors;
pub mod extract;
