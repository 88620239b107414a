//! Host access: who logged in, how, and who raised privileges (`access.*` events).
//!
//! [`parse`] reads the messages sshd, sudo, su and login write — from the journal
//! ([`journal`]: `journalctl`'s JSON) or the auth log ([`authlog`]: followed across
//! rotations); [`badge`] turns a keyboard-style badge reader's key presses into a keyed
//! card hash; [`door`] debounces and times a GPIO door contact. [`source`] follows the
//! login streams (or utmp, [`utmp`]); [`physical`] runs the door board's readers
//! (evdev, held exclusively) and contacts (GPIO character device).

pub mod authlog;
pub mod badge;
pub mod changes;
pub mod door;
pub mod journal;
pub mod parse;
pub mod physical;
pub mod source;
pub mod utmp;
