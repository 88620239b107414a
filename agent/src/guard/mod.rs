//! Guards: for each agent domain, what decides on the facts its source reports, with
//! the pure policy, and acts through an enforcer trait (the platform's, or a
//! recording double in tests) — the shape of the USB fence (`crate::fence`), which
//! was the first. A source observes and never decides or acts; a guard never
//! observes.
//!
//! | domain | source (facts) | guard | enforcer |
//! |---|---|---|---|
//! | USB devices | `source::usb` | `fence::Fence` | `fence::UsbEnforcer` (`fence::linux`) |
//! | files crossing the fence | `source::files` | [`files::FilesGuard`] | [`files::FileEnforcer`] (`guard::files::linux`) |
//! | outgoing transfers | `source::net` | [`net::NetGuard`] | [`net::NetEnforcer`] (`guard::net::linux`) |
//!
//! Platform code sits in each domain's `linux` module (`source::files::linux`,
//! `source::net::linux`, `fence::linux`, `guard::files::linux`, `guard::net::linux`),
//! compiled only for `target_os = "linux"`; another platform's backend and enforcer go
//! beside them, behind the same traits.
//!
//! One decision stays inside a source by necessity: the fanotify permission answer
//! (`source::files::linux`), which the kernel waits for while the opener is blocked.

pub mod files;
pub mod net;
