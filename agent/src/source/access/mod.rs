//! Host access: who logged in, how, and who raised privileges (`access.*` events).
//!
//! [`parse`] reads the messages sshd, sudo, su and login write (from the journal or
//! the auth log). The source that follows those streams and utmp is the rest of the
//! server-room access capability.

pub mod parse;
