//! The collector's end-to-end tests once more, with the collector on PostgreSQL
//! (issue "Beyond one box": the end-to-end suite passes on both engines).
//!
//! Each module below is one of the end-to-end test files, unchanged; this binary's
//! name makes `common::postgres_for_this_run` give every collector a PostgreSQL
//! database of its own (the SQLite runs are the files' own binaries). Built as one
//! more binary of the README's test command, so the two engines' runs share the
//! suite's time instead of adding a phase (`.config/nextest.toml` groups them as
//! their SQLite twins). Not here: the QEMU guests (the agent's kernel enforcement and
//! the packaged units; their collector stores what these store), the documented
//! SQLite walk-through (deployment), the tests that run no collector, and `cluster`
//! and `postgres`, which are on PostgreSQL already.

// Each file brings its own `mod common;`: the helpers are compiled once per module
// here, as in the files' own binaries.
#![allow(clippy::duplicate_mod)]

#[path = "access.rs"]
mod access;
#[path = "airgap.rs"]
mod airgap;
#[path = "broker.rs"]
mod broker;
#[path = "durability.rs"]
mod durability;
#[path = "enrollment.rs"]
mod enrollment;
#[path = "evidence.rs"]
mod evidence;
#[path = "export.rs"]
mod export;
#[path = "federation.rs"]
mod federation;
#[path = "network.rs"]
mod network;
#[path = "silent.rs"]
mod silent;
#[path = "spine.rs"]
mod spine;
#[path = "usb_fence.rs"]
mod usb_fence;
