//! Host access: who logged in, how, and who raised privileges (`access.*` events).
//!
//! [`parse`] reads the messages sshd, sudo, su and login write — from the journal
//! ([`journal`]: `journalctl`'s JSON) or the auth log ([`authlog`]: followed across
//! rotations); [`badge`] turns a keyboard-style badge reader's key presses into a keyed
//! card hash; [`door`] debounces and times a GPIO door contact. The sources that follow
//! those streams, utmp, the reader device and the door line are the rest of the
//! server-room access capability.

pub mod authlog;
pub mod badge;
pub mod door;
pub mod journal;
pub mod parse;
pub mod source;
